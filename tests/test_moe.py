"""MoE layer: routing against loop references, capacity, losses, padding, causality, and the
expert-parallel shard_map path against the einsum reference (values and gradients)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax.layers.moe import (
    MoE,
    expert_capacity,
    expert_choice_routing,
    load_balancing_loss,
    to_groups,
    from_groups,
)
from peer_jax.sharding import RULES_DATA_PARALLEL, RULES_DEFAULT, RULES_FSDP, make_mesh, state_shardings

D, M, E, B, T = 8, 16, 8, 8, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def make(seed=0, **kw):
    kw = {"num_experts": E, "mlp_dim": M, **kw}
    return MoE(D, rngs=nnx.Rngs(seed), **kw)


def inputs(seed=1, pad=0.25, b=B, t=T):
    kx, km = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (b, t, D), jnp.float32)
    mask = jax.random.uniform(km, (b, t)) >= pad
    return x, mask


def call(model, x, mask=None):
    """Output and sown metrics (the first value of each) of one call, read through
    `nnx.capture` (sow outside it is deprecated in Flax 0.12)."""
    y, sown = nnx.capture(lambda m, x: m(x, mask=mask), nnx.Intermediate)(model, x)
    return y, {k: v.get_value()[0] for k, v in sown.items()}


@functools.partial(jax.jit, static_argnums=0)
def _jit_call(graphdef, params, x, mask):
    return call(nnx.merge(graphdef, params), x, mask)


def jcall(model, x, mask=None):
    """`call`, jitted: one compile per configuration instead of one per eager op."""
    return _jit_call(*nnx.split(model), x, mask)


# --------------------------------------------------------------- float64 loop references
def np_params(model):
    return {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(model, nnx.Param)).items()}


def np_expert(p, e, xt, activation):
    h = xt @ p["w_in"][e]
    if activation == "swiglu":
        g = xt @ p["w_gate"][e]
        h = g / (1 + np.exp(-g)) * h
    else:  # jax.nn.gelu's default tanh approximation
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    return h @ p["w_out"][e]


def np_probs(p, x):
    logits = np.asarray(x, np.float64) @ p["router"]
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def token_choice_loop(model, x, mask, capacity):
    """Per token in position order: its top-k experts, each taken while the expert has room."""
    p, xn, mask = np_params(model), np.asarray(x, np.float64), np.asarray(mask)
    probs = np_probs(p, xn)
    y = np.zeros_like(xn)
    load = np.zeros(E)
    for b in range(x.shape[0]):
        used = np.zeros(E, int)  # sequence groups of the whole sequence
        for t in range(x.shape[1]):
            if not mask[b, t]:
                continue
            top = np.argsort(-probs[b, t])[: model.top_k]
            gates = probs[b, t, top] / probs[b, t, top].sum() if model.top_k > 1 else probs[b, t, top]
            for e, g in zip(top, gates):
                if used[e] < capacity:
                    used[e] += 1
                    y[b, t] += g * np_expert(p, e, xn[b, t], model.activation)
        load += used
    return y, load


def expert_choice_loop(model, x, mask, group_size):
    """Per group and expert: the top-C valid tokens by router prob."""
    p, xn, mask = np_params(model), np.asarray(x, np.float64), np.asarray(mask)
    probs = np_probs(p, xn)
    b_, t_ = mask.shape
    if model.grouping == "position":
        groups = [[(b, t) for b in range(g0, g0 + group_size)] for t in range(t_) for g0 in range(0, b_, group_size)]
    else:
        groups = [[(b, t) for t in range(g0, g0 + group_size)] for b in range(b_) for g0 in range(0, t_, group_size)]
    c = model.capacity(group_size)
    y, load = np.zeros_like(xn), np.zeros(E)
    for group in groups:
        valid = [bt for bt in group if mask[bt]]
        for e in range(E):
            chosen = sorted(valid, key=lambda bt: -probs[bt][e])[:c]
            load[e] += len(chosen)
            for bt in chosen:
                y[bt] += probs[bt][e] * np_expert(p, e, xn[bt], model.activation)
    return y, load


# ------------------------------------------------------------------------------- tests
def test_expert_capacity_rounds_half_up_with_floor_one_and_cap():
    assert expert_capacity(128, 128, 1.0) == 1
    assert expert_capacity(64, 128, 1.0) == 1  # 0.5 rounds up
    assert expert_capacity(8, 128, 1.0) == 1  # floor of 1
    assert expert_capacity(12, 8, 1.0) == 2  # 1.5 rounds up, not to even
    assert expert_capacity(20, 8, 1.25) == 3  # 3.125
    assert expert_capacity(2048, 128, 1.0) == 16
    assert expert_capacity(8, 8, 1.0, top_k=2) == 2
    assert expert_capacity(4, 2, 10.0) == 4  # never more slots than tokens


@pytest.mark.parametrize("routing,activation", [("expert_choice", "gelu"), ("token_choice", "swiglu")])
def test_shapes_dtypes_and_metrics(routing, activation):
    model = make(routing=routing, activation=activation, dtype=jnp.bfloat16)
    x, mask = inputs()
    y, metrics = jcall(model, x.astype(jnp.bfloat16), mask)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert metrics["aux_loss"].shape == () and metrics["aux_loss"].dtype == jnp.float32
    assert metrics["expert_load"].shape == (E,) and metrics["expert_load"].dtype == jnp.float32
    assert metrics["dropped_fraction"].shape == ()
    assert model.w_in.get_metadata()["out_sharding"] == ("experts", "embed", "moe_mlp")
    assert model.w_out.get_metadata()["out_sharding"] == ("experts", "moe_mlp", "embed")


def test_plain_call_records_nothing_and_warns_nothing():
    # The steps sow under nnx.capture; a plain call must neither grow the module's state nor
    # emit Flax's sow deprecation warning (pytest turns peer_jax DeprecationWarnings into errors).
    model = make(routing="token_choice")
    x, mask = inputs()
    model(x, mask=mask)
    assert not nnx.state(model, nnx.Intermediate)


def test_default_is_the_paper_baseline():
    model = nnx.eval_shape(lambda: MoE(D, rngs=nnx.Rngs(0)))
    settings = (model.num_experts, model.mlp_dim, model.routing, model.grouping)
    assert settings == (128, 4 * D, "expert_choice", "position")


@pytest.mark.parametrize("top_k,activation", [(1, "gelu"), (2, "swiglu")])
def test_token_choice_with_ample_capacity_equals_per_token_sum(top_k, activation):
    model = make(routing="token_choice", top_k=top_k, activation=activation, capacity_factor=E / top_k)
    assert model.capacity(T) == T
    x, mask = inputs()
    y, metrics = jcall(model, x, mask)
    y_ref, load_ref = token_choice_loop(model, x, mask, capacity=T)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_array_equal(metrics["expert_load"], load_ref)
    assert np.sum(load_ref) == top_k * np.sum(mask)
    assert metrics["dropped_fraction"] == 0.0


def test_token_choice_overflow_drops_later_tokens():
    model = make(routing="token_choice", top_k=2, capacity_factor=0.5)  # C = 1 of 8 tokens
    x, mask = inputs(pad=0.0)
    y, metrics = jcall(model, x, mask)
    y_ref, load_ref = token_choice_loop(model, x, mask, capacity=1)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_array_equal(metrics["expert_load"], load_ref)
    unrouted = np.all(np.asarray(y_ref) == 0, axis=-1).sum()
    assert unrouted > 0 and metrics["dropped_fraction"] == pytest.approx(unrouted / (B * T))


@pytest.mark.parametrize(
    "grouping,group_size,cf", [("position", None, 2.0), ("position", 4, 1.0), ("sequence", 4, 2.0)]
)
def test_expert_choice_equals_loop_reference_and_respects_capacity(grouping, group_size, cf):
    model = make(grouping=grouping, group_size=group_size, capacity_factor=cf)
    x, mask = inputs(pad=0.4)
    gs = model.resolved_group_size(B, T)
    y, metrics = jcall(model, x, mask)
    y_ref, load_ref = expert_choice_loop(model, x, mask, gs)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_array_equal(metrics["expert_load"], load_ref)

    # Per group and expert: exactly min(C, valid tokens) slots filled, each with one token.
    c = model.capacity(gs)
    probs = jax.nn.softmax(x @ model.router[...], axis=-1)
    valid_g = to_groups(mask, grouping, gs)
    dispatch, _ = expert_choice_routing(to_groups(probs, grouping, gs), valid_g, c)
    per_expert = np.asarray(dispatch.sum(axis=(1, 3)))  # [G, E]
    expected = np.minimum(c, np.asarray(valid_g.sum(-1)))[:, None]
    np.testing.assert_array_equal(per_expert, np.broadcast_to(expected, per_expert.shape))
    assert np.all(np.asarray(dispatch.sum(axis=1)) <= 1)  # a slot holds at most one token


def test_expert_choice_takes_exactly_capacity_when_no_padding():
    model = make(capacity_factor=1.0)  # position groups of B = 8 tokens, C = 1
    x, _ = inputs()
    _, metrics = jcall(model, x)
    np.testing.assert_array_equal(metrics["expert_load"], np.full(E, T * model.capacity(B)))


def test_grouping_roundtrip():
    a = jnp.arange(B * T).reshape(B, T)
    for grouping, gs in [("position", 4), ("position", B), ("sequence", 2)]:
        g = to_groups(a, grouping, gs)
        np.testing.assert_array_equal(from_groups(g, grouping, B, T), a)
    # a position group holds one position of consecutive sequences
    np.testing.assert_array_equal(to_groups(a, "position", 4)[1], a[4:8, 0])


def test_aux_loss_is_minimal_for_uniform_routing():
    x, mask = inputs()
    for z_w in (0.0, 1e-3):
        model = make(routing="token_choice", aux_loss_weight=0.01, z_loss_weight=z_w)
        model.router[...] = jnp.zeros_like(model.router[...])
        _, metrics = jcall(model, x, mask)
        np.testing.assert_allclose(metrics["aux_loss"], 0.01 * 1.0 + z_w * math.log(E) ** 2, rtol=1e-6)
    model = make(routing="expert_choice", z_loss_weight=1e-3)  # no balancing loss needed
    model.router[...] = jnp.zeros_like(model.router[...])
    _, metrics = jcall(model, x, mask)
    np.testing.assert_allclose(metrics["aux_loss"], 1e-3 * math.log(E) ** 2, rtol=1e-6)
    # Any imbalance costs more than the minimum.
    skewed = jax.nn.softmax(jnp.broadcast_to(jnp.arange(E, dtype=jnp.float32), (B, T, E)), axis=-1)
    assert load_balancing_loss(skewed, mask, top_k=2) > 1.5


@pytest.mark.parametrize(
    "kw", [dict(routing="expert_choice"), dict(routing="expert_choice", grouping="sequence"),
           dict(routing="token_choice", top_k=2)]
)
def test_padding_gets_zero_output_and_consumes_no_capacity(kw):
    model = make(capacity_factor=1.0, **kw)
    x, mask = inputs(pad=0.4)
    y, metrics = jcall(model, x, mask)
    assert np.all(np.asarray(y)[~np.asarray(mask)] == 0.0)
    # Padding content that would win every routing decision changes nothing.
    big = jnp.where(mask[..., None], x, 100.0 * x + 50.0)
    y2, metrics2 = jcall(model, big, mask)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(metrics2["expert_load"], metrics["expert_load"])
    # All padding: nothing routed, nothing dropped, no NaNs.
    y3, metrics3 = jcall(model, x, jnp.zeros((B, T), bool))
    assert np.all(np.asarray(y3) == 0.0) and np.all(np.asarray(metrics3["expert_load"]) == 0.0)
    assert metrics3["dropped_fraction"] == 0.0 and np.isfinite(metrics3["aux_loss"])


def test_position_grouping_is_causal_and_sequence_grouping_leaks():
    x, _ = inputs()
    t0 = T // 2
    future = x.at[:, t0:].set(5.0 * jax.random.normal(jax.random.key(9), (B, T - t0, D)))
    for grouping, leaks in [("position", False), ("sequence", True)]:
        model = make(grouping=grouping, capacity_factor=1.0)
        y, _ = jcall(model, x)
        y2, _ = jcall(model, future)
        past_changed = not np.array_equal(np.asarray(y)[:, :t0], np.asarray(y2)[:, :t0])
        assert past_changed == leaks, grouping


# ------------------------------------------------------------------ expert parallelism
def loss_and_grads(model, x, mask):
    graphdef, params = nnx.split(model, nnx.Param)
    r = jax.random.normal(jax.random.key(7), x.shape)

    def loss_fn(params, x):
        m = nnx.merge(graphdef, params)
        y, metrics = call(m, x, mask)
        return jnp.sum(y * r) + metrics["aux_loss"], (y, metrics)

    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    (_, (y, metrics)), grads = fn(params, x)
    return y, metrics, grads, fn.lower(params, x).as_text()


SHARDED_CASES = [
    ((2, 4, 1), dict(grouping="position", capacity_factor=2.0)),
    ((2, 2, 2), dict(grouping="position", group_size=4, activation="swiglu")),
    ((2, 4, 1), dict(grouping="sequence", group_size=4, capacity_factor=2.0)),
    ((1, 4, 2), dict(routing="token_choice", top_k=2, capacity_factor=0.5)),
]


def assert_expert_parallel_matches_reference(mesh_shape, rules, kw):
    """Values, metrics and grads of the shard_map path (parameters placed by `rules`, as the
    train state does) equal the single-device einsum reference; returns the sharded model."""
    x, mask = inputs(pad=0.25)
    ref_model = make(**kw)
    y_ref, m_ref, (g_params_ref, g_x_ref), _ = loss_and_grads(ref_model, x, mask)

    mesh = make_mesh(mesh_shape)
    model = make(**kw)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(params, state_shardings(params, mesh, rules)))
    xs = jax.device_put(x, NamedSharding(mesh, P(dict(rules)["batch"])))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        y, metrics, (g_params, g_x), hlo = loss_and_grads(model, xs, mask)
    assert "all_to_all" in hlo or "all-to-all" in hlo

    np.testing.assert_allclose(y, y_ref, **TOL)
    for k in m_ref:
        np.testing.assert_allclose(metrics[k], m_ref[k], **TOL)
    np.testing.assert_allclose(g_x, g_x_ref, **TOL)
    flat, flat_ref = nnx.to_pure_dict(g_params), nnx.to_pure_dict(g_params_ref)
    assert flat.keys() == flat_ref.keys()
    for k in flat_ref:
        assert np.any(np.asarray(flat_ref[k]) != 0), k
        np.testing.assert_allclose(flat[k], flat_ref[k], err_msg=k, **TOL)
    return model


@pytest.mark.parametrize("mesh_shape,kw", SHARDED_CASES)
def test_expert_parallel_matches_reference_values_and_grads(mesh_shape, kw):
    model = assert_expert_parallel_matches_reference(mesh_shape, RULES_DEFAULT, kw)
    assert model.w_in[...].sharding.spec == P("expert", None, "model")


def _rules(**changes):
    return tuple((name, changes.get(name, axes)) for name, axes in RULES_DEFAULT)


# mesh (data, expert, model), rules, layer settings, expected (token, expert, hidden) mesh axes
RULES_CASES = {
    # FSDP stores the weights' embed axis over 'data': the shard_map boundary regathers it.
    "fsdp": ((2, 4, 1), RULES_FSDP, dict(capacity_factor=2.0), (("data", "expert"), ("expert",), ("model",))),
    # 4-way expert parallelism over expert x model, hidden dims whole, tokens 8-way.
    "experts-over-expert-model": (
        (2, 2, 2), _rules(batch=("data", "expert", "model"), experts=("expert", "model"), moe_mlp=None),
        dict(activation="swiglu"), (("data", "expert", "model"), ("expert", "model"), ())),
    # Experts over 'data', hidden dims over 'expert': tokens only over 'data' (not over the
    # hidden axis, whose psum adds partials of the same tokens).
    "experts-over-data": (
        (2, 4, 1), _rules(experts="data", moe_mlp="expert"), dict(capacity_factor=2.0),
        (("data",), ("data",), ("expert",))),
    # 'batch' leaves out the expert axis: the boundary splits tokens over it anyway.
    "batch-over-data-only": (
        (2, 4, 1), _rules(batch="data"), dict(routing="token_choice", top_k=2, capacity_factor=0.5),
        (("data", "expert"), ("expert",), ("model",))),
}


@pytest.mark.parametrize("case", RULES_CASES)
def test_expert_parallel_axes_come_from_the_rules(case):
    mesh_shape, rules, kw, layout = RULES_CASES[case]
    abstract = nnx.eval_shape(lambda: make(**kw))
    with jax.set_mesh(make_mesh(mesh_shape)), nnx.logical_axis_rules(rules):
        assert abstract._ep_layout(B, T) == layout
    assert_expert_parallel_matches_reference(mesh_shape, rules, kw)


def test_rules_that_do_not_split_experts_use_the_reference_path():
    mesh, abstract = make_mesh((2, 4, 1)), nnx.eval_shape(make)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES_DATA_PARALLEL):
        assert abstract._ep_layout(B, T) is None
    with jax.set_mesh(mesh):  # no rules in context: the default rules
        assert abstract._ep_layout(B, T) == (("data", "expert"), ("expert",), ("model",))


def test_params_shard_by_logical_rules():
    mesh = make_mesh((2, 4, 1))
    model = make()
    abstract = nnx.state(model, nnx.Param)
    shardings = state_shardings(abstract, mesh, RULES_DEFAULT)
    assert shardings["w_out"].get_value().spec == P("expert", "model", None)
    assert shardings["router"].get_value().spec == P(None, None)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(routing="switch"), "routing"),
        (dict(grouping="batchwise"), "grouping"),
        (dict(activation="tanh"), "activation"),
        (dict(num_experts=0), "num_experts"),
        (dict(mlp_dim=0), "mlp_dim"),
        (dict(routing="token_choice", top_k=0), "top_k"),
        (dict(routing="token_choice", top_k=E + 1), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(group_size=0), "group_size"),
        (dict(aux_loss_weight=-1.0), "aux_loss_weight"),
    ],
)
def test_invalid_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_invalid_shapes_raise():
    x, mask = inputs()
    with pytest.raises(ValueError, match="group_size=3 must divide the batch size"):
        make(group_size=3)(x, mask=mask)
    with pytest.raises(ValueError, match="group_size=3 must divide the sequence length"):
        make(grouping="sequence", group_size=3)(x, mask=mask)
    with pytest.raises(ValueError, match="d_model"):
        make()(x[..., :4])
    # The checks run before any compute, so abstract (eval_shape) models suffice and are fast.
    six_experts, default, mlp6 = (nnx.eval_shape(lambda kw=kw: make(**kw)) for kw in
                                  (dict(num_experts=6), {}, dict(mlp_dim=6)))
    with jax.set_mesh(make_mesh((2, 4, 1))):
        with pytest.raises(ValueError, match="num_experts=6 must be divisible by the 'expert' mesh axis"):
            six_experts(x, mask=mask)
        with pytest.raises(ValueError, match="length 4 must be divisible"):
            default(x[:, :4], mask=mask[:, :4])
    with jax.set_mesh(make_mesh((1, 2, 4))):
        with pytest.raises(ValueError, match="mlp_dim=6 must be divisible by the 'model' mesh axis"):
            mlp6(x, mask=mask)
