"""Vocabularies: bytes (no files needed) or a SentencePiece model.

The embedded default uses `seqio.ByteVocabulary` (259 ids: pad 0, eos 1, unk 2, then bytes).
A SentencePiece model can be trained locally on the embedded corpus with
`python scripts/train_spm.py`; it is cached under `$PEER_JAX_CACHE` (default
`~/.cache/peer_jax`). For C4 runs point `vocabulary.spm_path` at T5's 32k C4 model
(`gs://t5-data/vocabs/cc_all.32000/sentencepiece.model`) or a local copy of it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import seqio

BYTE_VOCAB_SIZE = 259  # seqio.ByteVocabulary: 3 special ids + 256 bytes (tests check it against seqio)


def cache_dir() -> Path:
    return Path(os.environ.get("PEER_JAX_CACHE") or Path.home() / ".cache" / "peer_jax")


def default_spm_path(vocab_size: int = 8192) -> Path:
    return cache_dir() / "spm" / f"kjv_{vocab_size}.model"


class Vocabulary:
    """A vocabulary by its settings; the seqio Vocabulary behind it is built on first use.

    Importing seqio imports TensorFlow, seconds in every process. A run whose data is already
    packed (`pipeline.packed_arrays` caches it) needs only the byte vocabulary's size and name,
    so a train or eval process on the cache never imports either. Everything else (encode,
    decode, eos_id, ...) is the seqio Vocabulary's (`.seqio`).
    """

    def __init__(self, kind: str, spm_path: str | None = None):
        self.kind, self.spm_path = kind, spm_path

    @functools.cached_property
    def seqio(self) -> seqio.Vocabulary:
        import seqio

        return seqio.ByteVocabulary() if self.kind == "byte" else seqio.SentencePieceVocabulary(self.spm_path)

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE if self.kind == "byte" else self.seqio.vocab_size

    def __getattr__(self, name: str):
        if name.startswith("_"):  # copy/pickle probes; never build the tokenizer for them
            raise AttributeError(name)
        return getattr(self.seqio, name)

    def __repr__(self) -> str:
        return f"Vocabulary({self.kind!r}, {self.spm_path!r})"


def vocabulary(kind: str = "byte", spm_path: str | None = None) -> Vocabulary:
    """`kind`: 'byte' or 'spm' (SentencePiece at `spm_path`, default the locally trained one)."""
    if kind == "byte":
        return Vocabulary("byte")
    if kind == "spm":
        path = spm_path or str(default_spm_path())
        if not path.startswith("gs://") and not Path(path).exists():
            raise FileNotFoundError(
                f"vocabulary.spm_path={path!r} does not exist. Train one on the embedded corpus with "
                "`python scripts/train_spm.py` or set `vocabulary.spm_path` to an existing model."
            )
        return Vocabulary("spm", path)
    raise ValueError(f"vocabulary.kind={kind!r} is unknown; use 'byte' or 'spm'.")


def as_seqio(vocab: Vocabulary | seqio.Vocabulary) -> seqio.Vocabulary:
    """The seqio Vocabulary itself (for seqio features and tokenizing)."""
    return vocab.seqio if isinstance(vocab, Vocabulary) else vocab


def vocab_id(vocab: Vocabulary | seqio.Vocabulary) -> str:
    """A short stable name used in task names and cache keys."""
    if isinstance(vocab, Vocabulary) and vocab.kind == "byte":
        return "bytes"
    vocab = as_seqio(vocab)
    import seqio

    if isinstance(vocab, seqio.ByteVocabulary):
        return "bytes"
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        return f"spm{vocab.vocab_size}_{Path(vocab.sentencepiece_model_file).stem}"
    return type(vocab).__name__.lower()
