"""One train step on a 4×2 (data × model) mesh of fake CPU devices equals the 1-device step."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from peer_jax import sharding
from peer_jax.models.transformer import Transformer
from peer_jax.training import step as step_lib

V, B, T = 64, 8, 16


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
    w = np.ones((B, T), np.float32)
    w[0, -3:] = 0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": w, "segment_ids": seg, "positions": pos}


def _one_step(mesh_shape, devices, rules=sharding.RULES_DEFAULT, accum=2):
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    tx = optax.sgd(0.5)
    factory = functools.partial(Transformer, num_layers=2, d_model=32, num_heads=2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup, state, shard = step_lib.create_train_state(factory, tx, V, T, 0, mesh, rules)
        step = step_lib.jit_train_step(step_lib.make_train_step(setup, tx, accum), shard, setup)
        new_state, metrics = step(state, step_lib.host_batch(_batch(), setup))
        param_specs = jax.tree.map(lambda x: x.sharding.spec, new_state["params"])
        return float(metrics["loss"]), jax.device_get(new_state["params"]), param_specs


@pytest.fixture(scope="module")
def single():
    return _one_step((1, 1, 1), jax.devices()[:1])


def test_eight_fake_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("rules_name", ["default", "fsdp"])
def test_sharded_step_equals_single_device(single, rules_name):
    loss1, params1, _ = single
    loss8, params8, specs = _one_step((4, 1, 2), jax.devices(), sharding.get_rules(rules_name))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params8, params1)
    # The parameters really were sharded over `model` (not silently replicated).
    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert any("model" in tuple(s) for s in flat)


def test_grad_accumulation_equals_one_big_batch(single):
    loss1, params1, _ = single  # accum = 2
    loss_b, params_b, _ = _one_step((1, 1, 1), jax.devices()[:1], accum=1)
    np.testing.assert_allclose(loss_b, loss1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_b, params1)


def test_mesh_errors_name_the_setting():
    with pytest.raises(ValueError, match="mesh_shape"):
        sharding.make_mesh((3, 1, 1))
    with pytest.raises(ValueError, match="divisible"):
        sharding.make_mesh((-1, 3, 1))
    with pytest.raises(ValueError, match="preset"):
        sharding.get_rules("nope")


def test_optimizer_moments_are_sharded_like_params_and_expert_parallel_moe_starts():
    """Adam's mu/nu follow their parameter's sharding (not replicated), and a MoE model builds
    on a mesh with an expert axis (the stats probe must not trip the expert-parallel checks)."""
    from peer_jax.layers.moe import MoE
    from peer_jax.training import optim

    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.RULES_DEFAULT
    tx, _ = optim.make_optimizer(10)
    factory = functools.partial(Transformer, num_layers=2, d_model=32, num_heads=2,
                                sparse_ffw=functools.partial(MoE, num_experts=4))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        _, state, _ = step_lib.create_train_state(factory, tx, V, T, 0, mesh, rules)
        _, abstract, _ = step_lib.abstract_train_state(factory, tx, V, T, mesh, rules)
    adam = state["opt_state"][1][0]
    for moments in (adam.mu, adam.nu, abstract["opt_state"][1][0].mu):
        jax.tree.map(lambda m, p: assert_same_spec(m, p), moments, state["params"])
    assert state["params"]["blocks"][1]["ffw"]["w_in"].sharding.spec == jax.sharding.PartitionSpec("expert", None, "model")


def assert_same_spec(a, b):
    assert a.sharding.spec == b.sharding.spec, (a.sharding.spec, b.sharding.spec)
