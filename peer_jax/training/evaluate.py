"""Token-level perplexity and expert statistics over an eval split, or over its first batches.

One definition serves the trainer and `python -m peer_jax.eval`: a task's split is read in a
fixed order (`pipeline.eval_stream`), loss and token counts are summed over every batch
(padding has weight 0) and ppl = exp(Σloss / Σtokens). `evaluate_task` reads the whole split
unless `max_batches` caps it, and can also report the figures of its first `prefix_batches`
batches from the same pass (the trainer's fixed subset, see `training/loop.py`). Each result
says how many real tokens it covers (`tokens`) and, where known, how many the split holds
(`split_tokens`).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from peer_jax import multihost
from peer_jax.data import pipeline, tasks as tasks_lib
from peer_jax.layers import expert_stats
from peer_jax.training import step as step_lib


def accumulate(eval_step, setup: step_lib.ModelSetup, params, model_state, batches, empty_batch: dict,
               global_rows: int, *, hosts_agree: bool = True, prefix_batches: int | None = None):
    """Sums the eval step's outputs over batches; returns (totals, totals of the first `prefix_batches`).

    `batches` yields this process's block of each global batch of `global_rows` rows. With
    several processes and `hosts_agree` (streamed sets, whose host shards differ in size) the
    hosts agree before every step on whether any of them still has a batch; one that has run
    out contributes `empty_batch` (all padding), so every host runs the same number of steps
    and the prefix ends at the same global batch everywhere. Sets packed in memory give every
    host the same number of batches by construction, so they skip that per-step host
    synchronisation (`hosts_agree=False`). The prefix totals are those of all batches when the
    split has no more than `prefix_batches`, and None when `prefix_batches` is None.
    """
    totals, prefix, n = None, None, 0
    it = iter(batches)
    while True:
        batch = next(it, None)
        if hosts_agree and jax.process_count() > 1:
            if not multihost.any_host(batch is not None):
                break
            batch = empty_batch if batch is None else batch
        elif batch is None:
            break
        # One eval step in flight at a time, summed on the host (the same float32 adds): eval steps
        # do not depend on each other, and with all of them in flight XLA:CPU aborted runs on fake
        # CPU devices of a loaded host on a stuck all-reduce (independent executions may run
        # concurrently there and their collectives wait on each other's threads).
        out = jax.device_get(eval_step(params, model_state, step_lib.host_batch(batch, setup, global_rows)))
        totals = out if totals is None else jax.tree.map(np.add, totals, out)
        n += 1
        if n == prefix_batches:
            prefix = totals
    if totals is None:
        raise ValueError("the eval split produced no batches.")
    if prefix_batches is not None and prefix is None:
        prefix = totals
    return totals, prefix


def summarize(totals) -> dict[str, float]:
    """Loss, ppl and token count; for PEER/PKM layers usage and unevenness of the router-score
    mass summed over the batches (the paper's Table 2) and the sub-key usage of each half
    (`expert_stats.summary`), and for MoE the per-expert load spread."""
    totals = dict(jax.device_get(totals))
    tokens = float(totals.pop("tokens"))
    loss = float(totals.pop("loss_sum")) / max(tokens, 1.0)
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
    for name, mass in totals.items():
        layer = name.rsplit("/", 1)[0]
        if name.endswith("expert_mass"):
            result.update({f"{layer}/{stat}": v for stat, v in expert_stats.summary(mass).items()})
        elif name.endswith("expert_load"):
            load = np.asarray(mass, np.float64)
            result[f"{layer}/load_max_over_mean"] = float(load.max() / max(load.mean(), 1e-9))
    return result


def evaluate(eval_step, setup: step_lib.ModelSetup, params, model_state, batches, empty_batch: dict,
             global_rows: int, *, hosts_agree: bool = True) -> dict[str, float]:
    """`summarize` of every batch of `batches` (see `accumulate`)."""
    totals, _ = accumulate(eval_step, setup, params, model_state, batches, empty_batch, global_rows,
                           hosts_agree=hosts_agree)
    return summarize(totals)


def split_tokens(task: str, split: str, seq_len: int, vocab, eval_data_dir: str | None = None) -> int | None:
    """Real target tokens in a split packed in memory; None for streamed sets (not known up front)."""
    if tasks_lib.tfds_name(task) is not None:
        return None
    return int(pipeline.packed_arrays(task, split, seq_len, vocab, eval_data_dir=eval_data_dir)["weights"].sum())


def evaluate_task(eval_step, setup: step_lib.ModelSetup, params, model_state, task: str, *, split: str,
                  seq_len: int, vocab, global_rows: int, shard: tuple[int, int], max_batches: int | None = None,
                  prefix_batches: int | None = None,
                  eval_data_dir: str | None = None) -> tuple[dict[str, float], dict[str, float] | None]:
    """(metrics of the first `max_batches` global batches of `task`'s split, None = all of it;
    metrics of its first `prefix_batches`, or None), read by this process's `shard` = (index, count).

    Both carry `split_tokens` when the split's size is known: always for sets packed in
    memory, and for a streamed set when the whole split was read.
    """
    index, count = shard
    batches = pipeline.eval_stream(task, split, seq_len, vocab, global_rows, max_batches,
                                   shard_index=index, num_shards=count, eval_data_dir=eval_data_dir)
    totals, prefix = accumulate(eval_step, setup, params, model_state, batches,
                                pipeline.empty_batch(global_rows // count, seq_len), global_rows,
                                hosts_agree=tasks_lib.tfds_name(task) is not None, prefix_batches=prefix_batches)
    full = summarize(totals)
    size = split_tokens(task, split, seq_len, vocab, eval_data_dir)
    if size is None and max_batches is None:
        size = int(full["tokens"])
    results = (full, None if prefix is None else summarize(prefix))
    if size is not None:
        for r in results:
            if r is not None:
                r["split_tokens"] = float(size)
    return results
