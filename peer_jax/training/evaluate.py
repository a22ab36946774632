"""Token-level perplexity and expert statistics over a whole eval split."""

from __future__ import annotations

import math

import jax
import numpy as np

from peer_jax.layers import expert_stats
from peer_jax.training import step as step_lib


def evaluate(eval_step, setup: step_lib.ModelSetup, params, model_state, batches) -> dict[str, float]:
    """Sums loss and token counts over batches (padding has weight 0), then ppl = exp(Σloss/Σtokens).

    For PEER/PKM layers also reports usage and unevenness of the router-score mass summed
    over the whole split (the paper's Table 2), and for MoE the per-expert load spread.
    """
    totals = None
    for batch in batches:
        out = eval_step(params, model_state, step_lib.host_batch(batch, setup))
        totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    totals = jax.device_get(totals)
    tokens = float(totals.pop("tokens"))
    loss = float(totals.pop("loss_sum")) / max(tokens, 1.0)
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
    for name, mass in totals.items():
        layer = name.rsplit("/", 1)[0]
        if name.endswith("expert_mass"):
            result[f"{layer}/usage"] = float(expert_stats.usage(mass))
            result[f"{layer}/unevenness"] = float(expert_stats.unevenness(mass))
        elif name.endswith("expert_load"):
            load = np.asarray(mass, np.float64)
            result[f"{layer}/load_max_over_mean"] = float(load.max() / max(load.mean(), 1e-9))
    return result
