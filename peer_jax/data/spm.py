"""Trains a SentencePiece model on the embedded corpus (ids as seqio expects: pad 0, eos 1, unk 2)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import sentencepiece as spm

from peer_jax.data import tasks
from peer_jax.data.vocab import default_spm_path


def train_spm(vocab_size: int = 8192, out: str | None = None, max_docs: int | None = None) -> Path:
    """Trains on the KJV *train* split only (validation stays unseen); returns the model path."""
    path = Path(out) if out else default_spm_path(vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = tasks.kjv_documents()["train"][:max_docs]
    sentences = (line for doc in docs for line in doc.splitlines() if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path
