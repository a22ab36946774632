"""All FFW types (dense, MoE expert choice and dropless, PKM, PEER) are one gin binding apart,
and each trains on the embedded corpus."""

import json

import gin
import pytest

from peer_jax import gin_utils
from peer_jax.training import loop
from peer_jax.training.config import TrainConfig

SMALL = ["transformer.Transformer.num_layers = 2", "transformer.Transformer.d_model = 32",
         "transformer.Transformer.num_heads = 2", "config.TrainConfig.seq_len = 64",
         "config.TrainConfig.batch_size = 16", "config.TrainConfig.num_steps = 12",
         "config.TrainConfig.log_every = 1", "config.TrainConfig.eval_every = 6",
         "config.TrainConfig.eval_batches = 1", "config.TrainConfig.final_eval_batches = 1",
         "config.TrainConfig.eval_tasks = ['kjv']",
         "config.TrainConfig.checkpoint_every = 100", "config.TrainConfig.progress_bar = False",
         "config.TrainConfig.tensorboard = False", "config.TrainConfig.vocab_multiple = 64",
         "optim.make_optimizer.warmup_steps = 2", "optim.make_optimizer.peak_lr = 1e-2"]
# 32² product-key experts instead of the run's 128²: the same code paths, a fraction of the step time
SMALLER = {"tiny_cpu_pkm": ["pkm.PKM.num_experts = 1024"], "tiny_cpu_peer": ["peer.PEER.num_experts = 1024"]}


@pytest.mark.parametrize(
    "run", ["tiny_cpu", "tiny_cpu_moe", "tiny_cpu_moe_dropless", "tiny_cpu_pkm", "tiny_cpu_peer"]
)
def test_each_ffw_type_trains_with_falling_loss(run, tmp_path):
    gin_utils.parse([f"configs/runs/{run}.gin"], SMALL + SMALLER.get(run, []))
    try:  # the model factory reads its gin bindings when called, inside train()
        loop.train(gin.get_configurable(TrainConfig)(), str(tmp_path))
    finally:
        gin.clear_config()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.8, losses
    product_keys = run in ("tiny_cpu_pkm", "tiny_cpu_peer")
    train_row = next(r for r in rows if r["step"] == 12 and "loss" in r)
    assert bool([k for k in train_row if k.endswith("/usage")]) == product_keys  # product-key layers report usage
    # ... at intermediate (subset) evals too, and at the final eval under both names
    mid_eval = next(r for r in rows if r["step"] == 6 and "eval_subset/kjv/loss" in r)
    final_eval = rows[-1]
    for row, prefixes in ((mid_eval, ("eval_subset",)), (final_eval, ("eval_subset", "eval"))):
        for prefix in prefixes:
            assert (f"{prefix}/kjv/blocks/1/ffw/usage" in row) == product_keys, (prefix, sorted(row))
            assert (f"{prefix}/kjv/blocks/1/ffw/unevenness" in row) == product_keys
    if run in ("tiny_cpu_moe", "tiny_cpu_moe_dropless"):
        assert "blocks/1/ffw/dropped_fraction" in train_row and train_row["aux_loss"] > 0
