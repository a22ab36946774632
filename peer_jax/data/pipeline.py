"""Batches for training and eval, with an exactly resumable iterator state.

Two back ends share one interface (`next(it)`, `it.get_state()`, `it.set_state(state)`):

* `ArrayBatches` — the task split is run through seqio once (tokenize, chunk, pack), held as
  numpy arrays (and cached on disk), and batch *s* is a pure function of (seed, s): epoch e
  uses the permutation `default_rng([seed, e])`. The state is just the step, so resume is
  exact and O(1). Used for the embedded corpus and every small eval set.
* `streaming.GrainBatches` — corpora too large for memory (C4), read with Grain from a TFDS
  ArrayRecord copy; the state is a position, so resume time does not grow with the step.

Batches are dicts of int32/float32 arrays [batch, length]: `inputs`, `targets`, `weights`
(1 for real target tokens, 0 for padding), `segment_ids`, `positions`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from typing import TYPE_CHECKING

import numpy as np

from peer_jax.data import eval_tasks  # also registers the file-based eval sets
from peer_jax.data import streaming
from peer_jax.data import tasks as tasks_lib
from peer_jax.data.vocab import cache_dir

if TYPE_CHECKING:  # imported only to pack a split (`_pack`): a cached one needs neither seqio nor TF
    import seqio

_RENAME = {
    "decoder_input_tokens": "inputs",
    "decoder_target_tokens": "targets",
    "decoder_loss_weights": "weights",
    "decoder_segment_ids": "segment_ids",
    "decoder_positions": "positions",
}


def _to_batch(ex: dict) -> dict[str, np.ndarray]:
    out = {_RENAME[k]: np.asarray(v) for k, v in ex.items() if k in _RENAME}
    out["weights"] = out["weights"].astype(np.float32)
    return out


def _seqio_dataset(task: seqio.Task, split: str, seq_len: int, *, shuffle: bool = False, seed: int | None = None,
                   num_epochs: int | None = 1, shard_info: seqio.ShardInfo | None = None):
    import seqio

    return seqio.get_dataset(
        task,
        task_feature_lengths={"targets": seq_len},
        feature_converter=seqio.DecoderFeatureConverter(pack=True),
        dataset_split=split,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
        shard_info=shard_info,
        verbose=False,
    )


def packed_arrays(task_name: str, split: str, seq_len: int, vocab: seqio.Vocabulary, *,
                  eval_data_dir: str | None = None, use_cache: bool = True) -> dict[str, np.ndarray]:
    """All packed rows of a task split as arrays [rows, seq_len] (cached as .npz). A set read from
    files reads them from `eval_data_dir` (TrainConfig.eval_data_dir; see `eval_tasks.data_dir`)."""
    file_dir = eval_tasks.data_dir(eval_data_dir)
    name = tasks_lib.registered_name(task_name, vocab, file_dir)
    key = hashlib.sha1(repr((name, split, seq_len, _PIPELINE_VERSION) + tasks_lib.source_key(task_name)
                            ).encode()).hexdigest()[:12]
    path = cache_dir() / "packed" / f"{name}_{split}_{seq_len}_{key}.npz"
    if not use_cache:
        return _pack(tasks_lib.get_task(task_name, vocab, file_dir), task_name, split, seq_len)
    if path.exists():
        return _load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder per cache entry: processes sharing a cache (runs started together, the hosts of a
    # simulated pod) wait for the first one's arrays instead of each packing the split again.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return _load(path)
        arrays = _pack(tasks_lib.get_task(task_name, vocab, file_dir), task_name, split, seq_len)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a reader without the lock never sees a half-written cache
    return arrays


def _load(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _pack(task: seqio.Task, task_name: str, split: str, seq_len: int) -> dict[str, np.ndarray]:
    # Rows leave tf.data in blocks: one Python round trip per row costs more than the packing.
    ds = _seqio_dataset(task, split, seq_len).batch(_PACK_BLOCK)
    blocks = [_to_batch(ex) for ex in ds.as_numpy_iterator()]
    if not blocks:
        raise ValueError(f"data task {task_name!r} split {split!r} produced no examples.")
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


_PIPELINE_VERSION = 1  # bump when preprocessing changes, to invalidate cached arrays
_PACK_BLOCK = 4096  # rows per block out of tf.data; the arrays do not depend on it


class ArrayBatches:
    """Shuffled, epoch-cycling batches from in-memory arrays; batch s depends only on (seed, s).

    With several hosts every process computes the same global batch and keeps its block
    `shard_index` of `num_shards` contiguous blocks (see `multihost.process_row_block`).
    """

    def __init__(self, arrays: dict[str, np.ndarray], global_batch: int, *, seed: int = 0,
                 shard_index: int = 0, num_shards: int = 1):
        self.arrays, self.global_batch, self.seed = arrays, global_batch, seed
        self.num_rows = len(next(iter(arrays.values())))
        if global_batch % num_shards:
            raise ValueError(f"batch_size={global_batch} is not divisible by the {num_shards} host shards.")
        if self.num_rows < global_batch:
            raise ValueError(f"the data split has {self.num_rows} rows, fewer than batch_size={global_batch}.")
        self.local = slice(shard_index * global_batch // num_shards, (shard_index + 1) * global_batch // num_shards)
        self.steps_per_epoch = self.num_rows // global_batch
        self.step = 0
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s row order, kept until the epoch changes: drawing it costs as much as
        a small model's step on a large split (tens of ms for ~1 M rows)."""
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perm

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        idx = np.sort(perm[j * self.global_batch:(j + 1) * self.global_batch])[self.local]
        return {k: v[idx] for k, v in self.arrays.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": int(self.step), "seed": int(self.seed), "num_rows": int(self.num_rows)}

    def set_state(self, state: dict) -> None:
        if int(state["num_rows"]) != self.num_rows or int(state["seed"]) != self.seed:
            raise ValueError(
                f"checkpointed data state {state} does not match this pipeline (num_rows={self.num_rows}, "
                f"seed={self.seed}): the data, sequence length or seed changed since the checkpoint."
            )
        self.step = int(state["step"])


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, max_batches: int | None = None):
    """Sequential batches over a split; the last one is padded with all-padding rows."""
    n = len(next(iter(arrays.values())))
    num = -(-n // batch_size)
    if max_batches is not None:
        num = min(num, max_batches)
    for b in range(num):
        chunk = {k: v[b * batch_size:(b + 1) * batch_size] for k, v in arrays.items()}
        short = batch_size - len(chunk["targets"])
        if short:
            chunk = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        yield chunk


def eval_stream(task_name: str, split: str, seq_len: int, vocab: seqio.Vocabulary, batch_size: int,
                max_batches: int | None = None, *, shard_index: int = 0, num_shards: int = 1,
                eval_data_dir: str | None = None):
    """This host's blocks of global eval batches of `batch_size` rows, in a fixed order.

    Small sets are packed once and cached (`packed_arrays`): every host slices the same
    global batches. C4 is streamed, each host reading its own shard of the files, so hosts
    may run out at different batches (`training.evaluate` makes them agree). Either way the
    last batch is padded with all-padding rows, which carry weight 0. `max_batches` counts
    global batches.
    """
    local = batch_size // num_shards
    streamed = tasks_lib.tfds_name(task_name)
    if streamed is None:
        part = slice(shard_index * local, (shard_index + 1) * local)
        arrays = packed_arrays(task_name, split, seq_len, vocab, eval_data_dir=eval_data_dir)
        for batch in eval_batches(arrays, batch_size, max_batches):
            yield {k: v[part] for k, v in batch.items()}
        return
    yield from streaming.eval_batches(streamed, split, seq_len, vocab, local, shard_index=shard_index,
                                      num_shards=num_shards, max_batches=max_batches)


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding batch (weight 0 everywhere): what a host that has run out contributes."""
    return {k: np.zeros((rows, seq_len), np.float32 if k == "weights" else np.int32) for k in _RENAME.values()}

