"""Dropless token-choice MoE (`MoE(routing="dropless")`, peer_jax/layers/moe_dropless.py):
the sorted ragged_dot path against the one-hot einsum reference (values and gradients w.r.t.
the input and every parameter), against buffered token choice with ample capacity, padding,
causality, and the expert-parallel shard_map against the single-device path on 8 fake CPU
devices. Tolerance everywhere: rtol = atol = 1e-5 (float32), the same as tests/test_moe.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax.layers.moe import MoE, load_balancing_loss, router_z_loss
from peer_jax.layers.moe_dropless import dropless_reference
from peer_jax.sharding import RULES_DEFAULT, RULES_FSDP, make_mesh, state_shardings

D, M, E, B, T = 8, 16, 8, 8, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def make(seed=0, **kw):
    kw = {"num_experts": E, "mlp_dim": M, "routing": "dropless", **kw}
    return MoE(D, rngs=nnx.Rngs(seed), **kw)


def inputs(seed=1, pad=0.25):
    kx, km = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (B, T, D), jnp.float32)
    return x, jax.random.uniform(km, (B, T)) >= pad


def call(model, x, mask):
    y, sown = nnx.capture(lambda m, x: m(x, mask=mask), nnx.Intermediate)(model, x)
    return y, {k: v.get_value()[0] for k, v in sown.items()}


@functools.partial(jax.jit, static_argnums=0)
def _jit_call(graphdef, params, x, mask):
    return call(nnx.merge(graphdef, params), x, mask)


def jcall(model, x, mask):
    return _jit_call(*nnx.split(model), x, mask)


def model_loss_and_grads(model, x, mask):
    """y, metrics and grads of sum(y * r) w.r.t. (params, x), jitted; also the HLO text."""
    graphdef, params = nnx.split(model, nnx.Param)
    r = jax.random.normal(jax.random.key(7), x.shape)

    def loss_fn(params, x):
        y, metrics = call(nnx.merge(graphdef, params), x, mask)
        return jnp.sum(y * r), (y, metrics)

    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    (_, (y, metrics)), grads = fn(params, x)
    return y, metrics, grads, fn.lower(params, x).as_text()


def reference_loss_and_grads(model, x, mask):
    """The same loss through `dropless_reference` (every expert on every token)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    r = jax.random.normal(jax.random.key(7), x.shape)
    renorm = model.renormalize_top_k and model.top_k > 1

    def loss_fn(params, x):
        w = {k: v for k, v in params.items() if k != "router"}
        y = dropless_reference(x.reshape(B * T, D), params["router"], w, mask.reshape(B * T),
                               top_k=model.top_k, renormalize=renorm, activation=model.activation)
        y = y.reshape(B, T, D)
        return jnp.sum(y * r), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads


def assert_grads_close(g, g_ref):
    flat, flat_ref = nnx.to_pure_dict(g), g_ref if isinstance(g_ref, dict) else nnx.to_pure_dict(g_ref)
    assert flat.keys() == flat_ref.keys()
    for k in flat_ref:
        assert np.any(np.asarray(flat_ref[k]) != 0), k  # every parameter gets a gradient
        np.testing.assert_allclose(flat[k], flat_ref[k], err_msg=k, **TOL)


# ------------------------------------------------------------------------------ values
@pytest.mark.parametrize(
    "top_k,activation,grouped",
    [(1, "gelu", {}), (2, "swiglu", {}), (3, "relu", {}),
     # padded blocks: blocks of 3 rows leave most groups with a part-filled block; blocks of
     # 64 rows put every group in one block, most of it padding
     (1, "gelu", dict(grouped_matmul="padded_blocks", block_size=3)),
     (2, "swiglu", dict(grouped_matmul="padded_blocks", block_size=3)),
     (3, "relu", dict(grouped_matmul="padded_blocks", block_size=64))],
    ids=["k1-ragged", "k2-ragged", "k3-ragged", "k1-blocks3", "k2-blocks3", "k3-blocks64"],
)
def test_matches_one_hot_reference_values_and_grads(top_k, activation, grouped):
    model = make(top_k=top_k, activation=activation, **grouped)
    x, mask = inputs()
    y, metrics, (g_params, g_x), hlo = model_loss_and_grads(model, x, mask)
    y_ref, (g_params_ref, g_x_ref) = reference_loss_and_grads(model, x, mask)
    del hlo  # on CPU ragged_dot lowers to a masked dense dot, so look for it in the jaxpr
    jaxpr = str(jax.make_jaxpr(lambda x: model(x, mask=mask))(x))
    assert ("ragged_dot_general" in jaxpr) == (not grouped)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(g_x, g_x_ref, **TOL)
    assert_grads_close(g_params, g_params_ref)

    # Metrics: load = top-k assignments of the valid tokens, nothing dropped, the same aux
    # losses as buffered token choice.
    probs = jax.nn.softmax(x @ model.router[...], axis=-1)
    top = np.asarray(jax.lax.top_k(probs, top_k)[1])[np.asarray(mask)]
    np.testing.assert_array_equal(metrics["expert_load"], np.bincount(top.ravel(), minlength=E))
    assert metrics["dropped_fraction"] == 0.0
    aux = 0.01 * load_balancing_loss(probs, mask, top_k) + 1e-3 * router_z_loss(x @ model.router[...], mask)
    np.testing.assert_allclose(metrics["aux_loss"], aux, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_equals_buffered_token_choice_with_ample_capacity(top_k):
    x, mask = inputs()
    buffered = make(routing="token_choice", top_k=top_k, capacity_factor=E / top_k)  # same init
    assert buffered.capacity(T) == T  # every expert has room for the whole sequence group
    y, metrics = jcall(make(top_k=top_k), x, mask)
    y_ref, metrics_ref = jcall(buffered, x, mask)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_array_equal(metrics["expert_load"], metrics_ref["expert_load"])
    np.testing.assert_allclose(metrics["aux_loss"], metrics_ref["aux_loss"], rtol=1e-6)
    assert metrics_ref["dropped_fraction"] == metrics["dropped_fraction"] == 0.0


def test_bfloat16_compute_keeps_shape_and_dtype():
    model = make(top_k=2, dtype=jnp.bfloat16)
    x, mask = inputs()
    y, metrics = jcall(model, x.astype(jnp.bfloat16), mask)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert metrics["expert_load"].shape == (E,) and metrics["expert_load"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))


def test_padding_is_not_routed_and_outputs_zero():
    model = make(top_k=2)
    x, mask = inputs(pad=0.4)
    y, metrics, (_, g_x), _ = model_loss_and_grads(model, x, mask)
    pad = ~np.asarray(mask)
    assert pad.any() and np.all(np.asarray(y)[pad] == 0.0)
    assert np.all(np.asarray(g_x)[pad] == 0.0)  # padding does not reach any expert
    assert np.sum(metrics["expert_load"]) == 2 * np.sum(mask)
    # Padding content that would dominate any routing changes nothing.
    big = jnp.where(mask[..., None], x, 100.0 * x + 50.0)
    y2, metrics2 = jcall(model, big, mask)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(metrics2["expert_load"], metrics["expert_load"])
    # All padding: nothing routed, no NaNs.
    y3, metrics3 = jcall(model, x, jnp.zeros((B, T), bool))
    assert np.all(np.asarray(y3) == 0.0) and np.all(np.asarray(metrics3["expert_load"]) == 0.0)
    assert metrics3["dropped_fraction"] == 0.0 and np.isfinite(metrics3["aux_loss"])


def test_routing_is_per_token_hence_causal_and_batch_independent():
    model = make(top_k=2)
    x, mask = inputs(pad=0.0)
    t0 = T // 2
    future = x.at[:, t0:].set(5.0 * jax.random.normal(jax.random.key(9), (B, T - t0, D)))
    y, _ = jcall(model, x, mask)
    y2, _ = jcall(model, future, mask)
    np.testing.assert_allclose(np.asarray(y2)[:, :t0], np.asarray(y)[:, :t0], **TOL)
    y_one, _ = jcall(model, x[:1], mask[:1])  # one sequence alone: the same outputs
    np.testing.assert_allclose(y_one, np.asarray(y)[:1], **TOL)


# ------------------------------------------------------------------ expert parallelism
SHARDED_CASES = [
    # mesh (data, expert, model), rules, layer settings
    ((2, 4, 1), RULES_DEFAULT, dict(top_k=2)),
    ((2, 2, 2), RULES_DEFAULT, dict(top_k=2, activation="swiglu")),
    ((1, 4, 2), RULES_FSDP, dict(top_k=1)),
    # tokens split over 'data' only: each expert shard sees all its tokens, psum instead of
    # all-gather + reduce-scatter
    ((2, 4, 1), tuple((n, "data") if n == "batch" else (n, a) for n, a in RULES_DEFAULT), dict(top_k=3)),
    # padded blocks inside the shard_map (each shard pads its own local experts' groups)
    ((2, 4, 1), RULES_DEFAULT, dict(top_k=2, grouped_matmul="padded_blocks", block_size=4)),
]


@pytest.mark.parametrize("mesh_shape,rules,kw", SHARDED_CASES, ids=["d2e4", "d2e2m2", "e4m2-fsdp", "d2e4-psum", "d2e4-blocks"])
def test_expert_parallel_matches_single_device_values_and_grads(mesh_shape, rules, kw):
    x, mask = inputs()
    y_ref, m_ref, (g_params_ref, g_x_ref), _ = model_loss_and_grads(make(**kw), x, mask)

    mesh = make_mesh(mesh_shape)
    model = make(**kw)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(params, state_shardings(params, mesh, rules)))
    xs = jax.device_put(x, NamedSharding(mesh, P(dict(rules)["batch"])))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        y, metrics, (g_params, g_x), hlo = model_loss_and_grads(model, xs, mask)
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    gathered = "expert" in dict(rules)["batch"]
    assert (("all_gather" in hlo) or ("all-gather" in hlo)) == gathered
    assert ("reduce_scatter" in hlo or "reduce-scatter" in hlo) == gathered

    np.testing.assert_allclose(y, y_ref, **TOL)
    for k in m_ref:
        np.testing.assert_allclose(metrics[k], m_ref[k], err_msg=k, **TOL)
    np.testing.assert_allclose(g_x, g_x_ref, **TOL)
    assert_grads_close(g_params, g_params_ref)


def test_mesh_without_expert_split_uses_the_local_path():
    model = make(top_k=2)
    x, mask = inputs()
    y_ref, _ = jcall(model, x, mask)
    with jax.set_mesh(make_mesh((8, 1, 1))), nnx.logical_axis_rules(RULES_DEFAULT):
        graphdef, params = nnx.split(model)
        hlo = _jit_call.lower(graphdef, params, x, mask).as_text()
        y, _ = _jit_call(graphdef, params, x, mask)
    assert "manual_computation" not in hlo and "shard_map" not in hlo
    np.testing.assert_allclose(y, y_ref, **TOL)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(grouping="sequence"), "grouping"),
        (dict(group_size=4), "group_size"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=E + 1), "top_k"),
        (dict(grouped_matmul="megablocks"), "grouped_matmul"),
        (dict(block_size=0), "block_size"),
    ],
)
def test_invalid_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_invalid_expert_parallel_shapes_raise():
    x, mask = inputs()
    six, mlp6 = (nnx.eval_shape(lambda kw=kw: make(**kw)) for kw in (dict(num_experts=6), dict(mlp_dim=6)))
    with jax.set_mesh(make_mesh((2, 4, 1))), nnx.logical_axis_rules(RULES_DEFAULT):
        with pytest.raises(ValueError, match=r"num_experts=6 must be divisible by the expert mesh axes"):
            six(x, mask=mask)
        with pytest.raises(ValueError, match=r"batch size 4 must be divisible"):
            make()(x[:4], mask=mask[:4])
    with jax.set_mesh(make_mesh((1, 2, 4))), nnx.logical_axis_rules(RULES_DEFAULT):
        with pytest.raises(ValueError, match=r"mlp_dim=6 must be divisible by the 'moe_mlp' mesh axes"):
            mlp6(x, mask=mask)


def test_default_top_k_is_two_and_capacity_is_not_used():
    model = nnx.eval_shape(lambda: MoE(D, rngs=nnx.Rngs(0), routing="dropless"))
    assert (model.top_k, model.grouping, model.num_experts) == (2, None, 128)
    assert math.isclose(model.aux_loss_weight, 0.01)
