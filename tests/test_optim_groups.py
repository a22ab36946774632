"""Optimizer parameter groups (peer_jax/training/optim.py): group assignment from the parameters'
logical axes on tiny PEER and PKM models, per-group learning rate and decay, and the default
optimizer unchanged (same state layout, same step bit for bit)."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from peer_jax import sharding
from peer_jax.layers.peer import PEER
from peer_jax.layers.pkm import PKM
from peer_jax.models.transformer import Transformer
from peer_jax.training import optim
from peer_jax.training import step as step_lib

V, B, T = 64, 4, 16
LAYERS = {
    "peer": functools.partial(PEER, num_experts=16**2, heads=2, top_k=4, d_key=8),
    "pkm": functools.partial(PKM, num_experts=16**2, heads=2, top_k=4, d_key=8),
}
# The product-key layer's parameters and their groups (PEER: u, v; PKM: values).
EXPECTED = {
    "peer": {"u": "tables", "v": "tables", "router/sub_keys": "keys", "router/query": "query",
             "router/query_bn/scale": "query", "router/query_bn/bias": "query"},
    "pkm": {"values": "tables", "router/sub_keys": "keys", "router/query": "query",
            "router/query_bn/scale": "query", "router/query_bn/bias": "query"},
}


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, (B, T + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((B, T), np.float32),
            "segment_ids": np.ones((B, T), np.int32), "positions": np.arange(T)[None].repeat(B, 0).astype(np.int32)}


def _flat(tree) -> dict:
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _steps(layer, tx, n=1):
    """(params before, params after n train steps) of a 2-layer model whose middle FFW is
    `layer`, trained with `tx` on one fixed batch."""
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = sharding.RULES_DEFAULT
    factory = functools.partial(Transformer, num_layers=2, d_model=32, num_heads=2, sparse_ffw=LAYERS[layer])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup, state, shard = step_lib.create_train_state(factory, tx, V, T, 0, mesh, rules)
        before = jax.device_get(state["params"])
        step = step_lib.jit_train_step(step_lib.make_train_step(setup, tx), shard, setup)
        batch = step_lib.host_batch(_batch(), setup)
        for _ in range(n):
            state, _ = step(state, batch)
        return before, jax.device_get(state["params"])


def _init(layer, tx):
    """Initial parameters of the tiny model (host arrays); gives `tx` its group labels."""
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    factory = functools.partial(Transformer, num_layers=2, d_model=32, num_heads=2, sparse_ffw=LAYERS[layer])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES_DEFAULT):
        spec = step_lib.train_state_spec(factory, tx, V, T, 0, mesh, sharding.RULES_DEFAULT)
        return jax.device_get(spec.init()["params"])


def _labels(layer):
    tx, _ = optim.make_optimizer(10, param_groups={})
    _init(layer, tx)
    return _flat(tx.labels.tree)


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_groups_from_logical_axes(layer):
    labels = _labels(layer)
    sparse = {k.split("/ffw/", 1)[1]: g for k, g in labels.items() if k.startswith("blocks/1/ffw/")}
    assert sparse == EXPECTED[layer]
    # Everything outside the product-key layer (embeddings, attention, dense FFW, norms) is 'rest'.
    assert {g for k, g in labels.items() if not k.startswith("blocks/1/ffw/")} == {"rest"}


def test_param_group_rules():
    assert optim.param_group(("expert_rows", "expert_embed")) == "tables"
    assert optim.param_group(("layers", "expert_rows", "expert_embed")) == "tables"  # scanned layers
    assert optim.param_group((None, "keys", "key_dim")) == "keys"
    assert optim.param_group(("embed", "key_dim")) == "query"
    assert optim.param_group(("key_dim",)) == "query"
    assert optim.param_group(("embed", "mlp")) == "rest"
    assert optim.param_group(None) == "rest"


def _eager_updates(layer, tx, n=3):
    """Parameters and optimizer state after `n` updates with fixed pseudo-random gradients, op by
    op (no jit: every elementwise operation runs as written, so equal arithmetic is bit-equal)."""
    params = _init(layer, tx)
    state = tx.init(params)
    rng = np.random.default_rng(1)
    for _ in range(n):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype) * 0.1, params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return jax.device_get(params), jax.device_get(state)


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_default_optimizer_is_the_plain_adamw_bit_for_bit(layer):
    """No groups: the single AdamW that earlier runs used and checkpoints hold (the reference,
    built here directly): same state layout, same parameters and moments after 3 updates."""
    kw = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    schedule = optim.lr_schedule(3e-3, 10, 2)
    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p), **kw))
    tx, _ = optim.make_optimizer(10, peak_lr=3e-3, warmup_steps=2, **kw)
    ref_params, ref_opt = _eager_updates(layer, reference)
    params, opt = _eager_updates(layer, tx)
    assert jax.tree.structure(opt) == jax.tree.structure(ref_opt)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    jax.tree.map(np.testing.assert_array_equal, opt, ref_opt)


def test_groups_with_default_settings_equal_no_groups():
    """Same arithmetic per element, to the last bit or so: optax jit-compiles its bias correction
    (a division) once per tree, and compiled for the split-up trees XLA:CPU may round the last bit
    of a few elements differently."""
    tx_plain, _ = optim.make_optimizer(10, warmup_steps=2)
    tx_grouped, _ = optim.make_optimizer(10, warmup_steps=2, param_groups={"tables": {}, "keys": {"lr_scale": 1.0}})
    plain, _ = _eager_updates("peer", tx_plain)
    grouped, _ = _eager_updates("peer", tx_grouped)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=0), grouped, plain)


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_lr_scale_zero_freezes_the_group(layer):
    tx, _ = optim.make_optimizer(10, warmup_steps=0, param_groups={"tables": {"lr_scale": 0.0},
                                                                   "keys": {"lr_scale": 0.0}})
    before, after = _steps(layer, tx, n=1)
    labels = _flat(tx.labels.tree)
    before, after = _flat(before), _flat(after)
    for name, group in labels.items():
        if group in ("tables", "keys"):
            np.testing.assert_array_equal(after[name], before[name])
        elif name.endswith("ffw/router/query"):  # the rest still trains
            assert not np.array_equal(after[name], before[name])


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_decay_off_for_a_group(layer):
    """With zero gradients AdamW's update is its decay alone: p ← p·(1 − lr·wd). A group with
    weight_decay 0 keeps its values; the others shrink by exactly that factor."""
    lr, wd = 0.5, 0.1
    tx, _ = optim.make_optimizer(10, peak_lr=lr, warmup_steps=0, final_lr_fraction=1.0, weight_decay=wd,
                                 grad_clip_norm=None, param_groups={"tables": {"weight_decay": 0.0}})
    params = _init(layer, tx)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = _flat(optax.apply_updates(params, updates))
    old, labels = _flat(params), _flat(tx.labels.tree)
    decayed = 0
    for name, group in labels.items():
        if group == "tables":
            np.testing.assert_array_equal(new[name], old[name])
        elif old[name].ndim >= 2:
            np.testing.assert_allclose(new[name], old[name] * (1 - lr * wd), rtol=1e-6)
            decayed += 1
    assert decayed > 0 and "tables" in labels.values()


def test_bad_groups_fail_with_the_setting():
    with pytest.raises(ValueError, match="unknown group 'table'"):
        optim.make_optimizer(10, param_groups={"table": {}})
    with pytest.raises(ValueError, match=r"param_groups\['keys'\]"):
        optim.make_optimizer(10, param_groups={"keys": {"lr": 1.0}})
    with pytest.raises(ValueError, match="lr_scale and weight_decay"):
        optim.make_optimizer(10, param_groups={"keys": {"lr_scale": -1.0}})


def test_grouped_optimizer_needs_labels():
    tx, _ = optim.make_optimizer(10, param_groups={"tables": {"weight_decay": 0.0}})
    with pytest.raises(ValueError, match="train_state_spec"):
        tx.init({"w": np.zeros((2, 2), np.float32)})


def test_groups_on_a_model_without_product_key_layers():
    """A dense model has only 'rest' parameters; the empty groups must not break the optimizer."""
    tx, _ = optim.make_optimizer(10, warmup_steps=0, param_groups={"keys": {"lr_scale": 0.1}})
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    factory = functools.partial(Transformer, num_layers=1, d_model=16, num_heads=2, sparse_ffw=None)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES_DEFAULT):
        spec = step_lib.train_state_spec(factory, tx, V, T, 0, mesh, sharding.RULES_DEFAULT)
        params = jax.device_get(spec.init()["params"])
    assert set(jax.tree.leaves(spec.labels)) == {"rest"}
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.all(u != 0) for u in jax.tree.leaves(updates))
