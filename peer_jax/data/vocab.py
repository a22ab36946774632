"""Vocabularies: bytes (no files needed) or a SentencePiece model.

The embedded default uses `seqio.ByteVocabulary` (259 ids: pad 0, eos 1, unk 2, then bytes).
A SentencePiece model can be trained locally on the embedded corpus with
`python scripts/train_spm.py`; it is cached under `$PEER_JAX_CACHE` (default
`~/.cache/peer_jax`). For C4 runs point `vocabulary.spm_path` at T5's 32k C4 model
(`gs://t5-data/vocabs/cc_all.32000/sentencepiece.model`) or a local copy of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import seqio


def cache_dir() -> Path:
    return Path(os.environ.get("PEER_JAX_CACHE") or Path.home() / ".cache" / "peer_jax")


def default_spm_path(vocab_size: int = 8192) -> Path:
    return cache_dir() / "spm" / f"kjv_{vocab_size}.model"


def vocabulary(kind: str = "byte", spm_path: str | None = None) -> seqio.Vocabulary:
    """`kind`: 'byte' or 'spm' (SentencePiece at `spm_path`, default the locally trained one)."""
    if kind == "byte":
        return seqio.ByteVocabulary()
    if kind == "spm":
        path = spm_path or str(default_spm_path())
        if not path.startswith("gs://") and not Path(path).exists():
            raise FileNotFoundError(
                f"vocabulary.spm_path={path!r} does not exist. Train one on the embedded corpus with "
                "`python scripts/train_spm.py` or set `vocabulary.spm_path` to an existing model."
            )
        return seqio.SentencePieceVocabulary(path)
    raise ValueError(f"vocabulary.kind={kind!r} is unknown; use 'byte' or 'spm'.")


def vocab_id(vocab: seqio.Vocabulary) -> str:
    """A short stable name used in task names and cache keys."""
    if isinstance(vocab, seqio.ByteVocabulary):
        return "bytes"
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        return f"spm{vocab.vocab_size}_{Path(vocab.sentencepiece_model_file).stem}"
    return type(vocab).__name__.lower()
