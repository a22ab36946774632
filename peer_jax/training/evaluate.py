"""Token-level perplexity and expert statistics over a whole eval split."""

from __future__ import annotations

import math

import jax
import numpy as np

from peer_jax import multihost
from peer_jax.layers import expert_stats
from peer_jax.training import step as step_lib


def evaluate(eval_step, setup: step_lib.ModelSetup, params, model_state, batches, empty_batch: dict,
             global_rows: int, *, hosts_agree: bool = True) -> dict[str, float]:
    """Sums loss and token counts over batches (padding has weight 0), then ppl = exp(Σloss/Σtokens).

    `batches` yields this process's block of each global batch of `global_rows` rows. With
    several processes and `hosts_agree` (streamed sets, whose host shards differ in size) the
    hosts agree before every step on whether any of them still has a batch; one that has run
    out contributes `empty_batch` (all padding), so every host runs the same number of steps.
    Sets packed in memory give every host the same number of batches by construction, so they
    skip that per-step host synchronisation (`hosts_agree=False`).

    For PEER/PKM layers also reports usage and unevenness of the router-score mass summed over
    the whole split (the paper's Table 2) and the sub-key usage of each half
    (`expert_stats.summary`), and for MoE the per-expert load spread.
    """
    totals = None
    it = iter(batches)
    while True:
        batch = next(it, None)
        if hosts_agree and jax.process_count() > 1:
            if not multihost.any_host(batch is not None):
                break
            batch = empty_batch if batch is None else batch
        elif batch is None:
            break
        out = eval_step(params, model_state, step_lib.host_batch(batch, setup, global_rows))
        totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    if totals is None:
        raise ValueError("the eval split produced no batches.")
    totals = jax.device_get(totals)
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
