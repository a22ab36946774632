"""Streamed corpora (C4) with Grain over a TFDS ArrayRecord data source: resume by position.

A corpus too large to hold packed in memory is read through `tfds.data_source`, a random-
access view of the ArrayRecord files (MaxText's choice for C4). Grain builds a deterministic
pipeline on top of it:

    source → global shuffle (per epoch, an index permutation) → repeat → this host's stride
    → tokenize + EOS → split into ≤ seq_len chunks → first-fit pack into rows → batch

Every stage up to the host stride is a pure function of the index, so the iterator state is
a position (the next index, the packer's window), and `set_state` re-reads at most one
packing window: resuming at step 10⁵ costs what resuming at step 1 does (docs/pod_scale.md),
where replaying a tf.data stream with `skip(step)` grows with the step.
The state is plain JSON and is saved in the checkpoint with the model.

Why Grain + ArrayRecord rather than a checkpointed tf.data iterator: tf.data's iterator
checkpoint holds shuffle buffers (gigabytes for C4) and cannot be inspected or resharded,
and seqio has no random access; Grain's state is a few integers per host.

The corpus must be prepared in ArrayRecord format (`tfds build c4/en:3.1.0
--file_format=array_record`, or `tfds convert_format` of an existing TFRecord copy) under
`$TFDS_DATA_DIR` (which may be gs://). Hosts take every `num_shards`-th document of the
shuffled order, so they read disjoint documents.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import grain
import numpy as np

from peer_jax import cli
from peer_jax.data import vocab as vocab_lib

if TYPE_CHECKING:
    import seqio


def data_source(tfds_name: str, split: str):
    """The random-access TFDS source of `tfds_name` (from $TFDS_DATA_DIR); a clear error if absent."""
    import tensorflow_datasets as tfds

    data_dir = os.environ.get("TFDS_DATA_DIR")
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises many types for a missing or TFRecord dataset
        raise FileNotFoundError(
            f"the streamed corpus {tfds_name!r} (split {split!r}) has no ArrayRecord copy in TFDS_DATA_DIR="
            f"{data_dir or '(tfds default)'} ({cli.first_line(e)}). "
            f"Prepare it with `tfds build {tfds_name} --file_format=array_record` (or `tfds convert_format "
            "--out_file_format=array_record` of a TFRecord copy) and set TFDS_DATA_DIR.") from e


class _Chunks(grain.experimental.FlatMapTransform):
    """Text → token ids + EOS, split into chunks of at most seq_len (nothing is truncated away)."""

    max_fan_out = 1 << 20

    def __init__(self, vocab: seqio.Vocabulary, seq_len: int):
        self.vocab, self.seq_len = vocab_lib.as_seqio(vocab), seq_len

    def flat_map(self, example):
        text = example["text"]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        ids = np.asarray(list(self.vocab.encode(text)) + [self.vocab.eos_id], np.int32)
        return [{"targets": ids[i:i + self.seq_len]} for i in range(0, len(ids), self.seq_len)]


def _rows(packed: dict) -> dict[str, np.ndarray]:
    """Grain's packed features → the model's batch (inputs are targets shifted within a segment)."""
    targets = np.asarray(packed["targets"], np.int32)
    seg = np.asarray(packed["targets_segment_ids"], np.int32)
    pos = np.asarray(packed["targets_positions"], np.int32)
    inputs = np.zeros_like(targets)
    inputs[..., 1:] = np.where(seg[..., 1:] == seg[..., :-1], targets[..., :-1], 0)
    return {"inputs": inputs, "targets": targets, "weights": (seg > 0).astype(np.float32),
            "segment_ids": seg, "positions": pos}


def _packed(ds: grain.MapDataset, vocab, seq_len: int, rows: int) -> grain.IterDataset:
    it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), _Chunks(vocab, seq_len))
    it = grain.experimental.FirstFitPackIterDataset(it, length_struct={"targets": seq_len}, num_packing_bins=rows,
                                                    shuffle_bins=False)
    return it.batch(rows, drop_remainder=False).map(_rows)


class GrainBatches:
    """This host's block of every global training batch, endlessly, with a positional state."""

    def __init__(self, tfds_name: str, split: str, seq_len: int, vocab: seqio.Vocabulary, global_batch: int, *,
                 seed: int = 0, shard_index: int = 0, num_shards: int = 1):
        if global_batch % num_shards:
            raise ValueError(f"batch_size={global_batch} is not divisible by the {num_shards} host shards.")
        self.seed, self.rows = seed, global_batch // num_shards
        self.shard = (shard_index, num_shards)
        source = grain.MapDataset.source(data_source(tfds_name, split))
        ds = source.shuffle(seed=seed).repeat(None)[shard_index::num_shards]
        self._it = iter(_packed(ds, vocab, seq_len, self.rows))
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step, "seed": self.seed, "shard": list(self.shard),
                "grain": json.loads(json.dumps(self._it.get_state()))}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed or list(state.get("shard", self.shard)) != list(self.shard):
            raise ValueError(
                f"checkpointed data state (seed {state['seed']}, host shard {state.get('shard')}) does not match this "
                f"run (seed {self.seed}, host shard {list(self.shard)}): the data seed or the number of hosts changed.")
        self._it.set_state(state["grain"])
        self.step = int(state["step"])


def eval_batches(tfds_name: str, split: str, seq_len: int, vocab: seqio.Vocabulary, rows: int, *,
                 shard_index: int = 0, num_shards: int = 1, max_batches: int | None = None):
    """This host's packed eval batches of `rows` rows over its documents (every `num_shards`-th),
    in file order, the last one padded. Hosts may run out at different batches."""
    ds = grain.MapDataset.source(data_source(tfds_name, split))[shard_index::num_shards]
    for b, batch in enumerate(_packed(ds, vocab, seq_len, rows)):
        if max_batches is not None and b >= max_batches:
            return
        short = rows - len(batch["targets"])
        if short:
            batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        yield batch
