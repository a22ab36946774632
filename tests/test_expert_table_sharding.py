"""The table rules presets (`fsdp_expert_tables`: PEER/PKM table rows split over `data`, d_model over
`model`; `memory_parallel`: d_model over `model` × `expert`): Adam moments sharded like the
tables, and a train step on 8 fake CPU devices equal to the single-device step."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from peer_jax import sharding
from peer_jax.layers.peer import PEER
from peer_jax.layers.pkm import PKM
from peer_jax.models.transformer import Transformer
from peer_jax.training import step as step_lib

V, B, T = 64, 8, 16
LAYERS = {
    "peer": functools.partial(PEER, num_experts=16**2, heads=2, top_k=4, d_key=8),
    "pkm": functools.partial(PKM, num_experts=16**2, heads=2, top_k=4, d_key=8),
}


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, (B, T + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((B, T), np.float32),
            "segment_ids": np.ones((B, T), np.int32), "positions": np.arange(T)[None].repeat(B, 0).astype(np.int32)}


def _one_step(layer, mesh_shape, devices, rules):
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    # SGD with momentum: its trace mirrors the parameters like Adam's moments, but the step does
    # not divide by √ν, which turns rounding-level differences of near-zero gradients into O(lr)
    # updates (Adam's sharding is checked separately, below).
    tx = optax.sgd(0.5, momentum=0.9)
    factory = functools.partial(Transformer, num_layers=2, d_model=32, num_heads=2, sparse_ffw=LAYERS[layer])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup, state, shard = step_lib.create_train_state(factory, tx, V, T, 0, mesh, rules)
        step = step_lib.jit_train_step(step_lib.make_train_step(setup, tx), shard, setup)
        new_state, metrics = step(state, step_lib.host_batch(_batch(), setup))
    return float(metrics["loss"]), new_state


@pytest.mark.parametrize(
    "layer,preset,mesh_shape,spec,shard",
    [("peer", "fsdp_expert_tables", (4, 1, 2), P(("expert", "data"), "model"), (16**2 // 4, 32 // 2)),
     pytest.param("pkm", "fsdp_expert_tables", (4, 1, 2), P(("expert", "data"), "model"), (16**2 // 4, 32 // 2),
                  marks=pytest.mark.slow),
     ("peer", "memory_parallel", (2, 4, 1), P(None, ("model", "expert")), (16**2, 32 // 4)),
     ("pkm", "memory_parallel", (2, 4, 1), P(None, ("model", "expert")), (16**2, 32 // 4))],
)
def test_train_step_equals_single_device(layer, preset, mesh_shape, spec, shard):
    """A whole train step (model, loss, optimizer) on 8 devices equals the single-device step:
    `fsdp_expert_tables` (rows over data, columns over model) and `memory_parallel` (columns over
    the 4 devices of the expert axis, replicated over data; the tokens move to the tables)."""
    loss1, state1 = _one_step(layer, (1, 1, 1), jax.devices()[:1], sharding.RULES_DEFAULT)
    loss8, state8 = _one_step(layer, mesh_shape, jax.devices(), sharding.get_rules(preset))
    ffw = state8["params"]["blocks"][1]["ffw"]
    name = "u" if layer == "peer" else "values"
    assert ffw[name].sharding.spec == spec
    trace = state8["opt_state"][0].trace["blocks"][1]["ffw"][name]
    assert trace.sharding.spec == spec  # optimizer state sharded like the table
    assert trace.addressable_shards[0].data.shape == shard
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state8["params"]), jax.device_get(state1["params"]))


def test_adam_moments_are_sharded_like_the_tables():
    from peer_jax.training import optim

    mesh = sharding.make_mesh((4, 1, 2))
    rules = sharding.get_rules("fsdp_expert_tables")
    tx, _ = optim.make_optimizer(10)
    factory = functools.partial(Transformer, num_layers=2, d_model=32, num_heads=2, sparse_ffw=LAYERS["peer"])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        _, state, _ = step_lib.abstract_train_state(factory, tx, V, T, mesh, rules)
    adam = state["opt_state"][1][0]
    for moments in (adam.mu, adam.nu):
        for name in ("u", "v"):
            assert moments["blocks"][1]["ffw"][name].sharding.spec == P(("expert", "data"), "model")


def test_preset_only_changes_the_table_rows():
    default, fsdp = dict(sharding.RULES_DEFAULT), dict(sharding.get_rules("fsdp_expert_tables"))
    assert {k for k in default if default[k] != fsdp[k]} == {"expert_rows"}
