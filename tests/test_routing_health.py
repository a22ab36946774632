"""Routing health during training: every intermediate eval of a PEER run reports usage,
unevenness and sub-key usage, with the optimizer's parameter groups set from gin."""

import json

import gin

from peer_jax import gin_utils
from peer_jax.training import loop
from peer_jax.training.config import TrainConfig

SMALL = ["transformer.Transformer.num_layers = 2", "transformer.Transformer.d_model = 32",
         "transformer.Transformer.num_heads = 2", "config.TrainConfig.seq_len = 64",
         "config.TrainConfig.batch_size = 8", "config.TrainConfig.num_steps = 6",
         "config.TrainConfig.log_every = 3", "config.TrainConfig.eval_every = 3",
         "config.TrainConfig.eval_batches = 1", "config.TrainConfig.final_eval_batches = 1",
         "config.TrainConfig.eval_tasks = ['kjv']",
         "config.TrainConfig.checkpoint_every = 100", "config.TrainConfig.progress_bar = False",
         "config.TrainConfig.tensorboard = False", "config.TrainConfig.vocab_multiple = 64",
         "optim.make_optimizer.warmup_steps = 1",
         "optim.make_optimizer.param_groups = {'keys': {'lr_scale': 0.1}, 'tables': {'weight_decay': 0.0}}",
         "peer.PEER.num_experts = 256", "peer.PEER.heads = 2", "peer.PEER.top_k = 4", "peer.PEER.d_key = 8"]


def test_intermediate_evals_report_routing_health(tmp_path):
    gin_utils.parse(["configs/runs/tiny_cpu_peer.gin"], SMALL)
    try:
        loop.train(gin.get_configurable(TrainConfig)(), str(tmp_path))
    finally:
        gin.clear_config()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_subset/kjv/loss" in r]  # the intermediate evals' subset figures
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        stats = {k.rsplit("/", 1)[1]: v for k, v in r.items() if k.startswith("eval_subset/kjv/blocks/1/ffw/")}
        assert set(stats) == {"usage", "unevenness", "key_usage_1", "key_usage_2"}
        assert 0 < stats["usage"] <= min(stats["key_usage_1"], stats["key_usage_2"]) <= 1
