"""PEER layer: reference formula, efficient == naive (values and grads), query BatchNorm with
padding, the k=1 ⇔ MLP identity, statistics, validation.

Shapes are tiny and every check runs inside one `jax.jit` per configuration: eager ops
compile one by one on CPU and would dominate the test time.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peer_jax.layers import expert_compute as ec
from peer_jax.layers import expert_stats
from peer_jax.layers.peer import PEER

D, N, H, K, DK = 16, 64, 3, 4, 8  # n = 8 sub-keys per half
B, T = 2, 5
RTOL, ATOL = 1e-5, 1e-6  # fp32: observed differences are ~1e-7

_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)
COT = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)
MASK = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)


def make(**kw) -> PEER:
    """A PEER with numpy-random parameters.

    Construction is traced abstractly (`nnx.eval_shape`) and filled from numpy: the eager
    jax.random initialisers would cost ~14 small XLA compiles per configuration. The real
    initialisers are exercised once, in `test_real_init_and_dtypes`.
    """
    cfg = dict(num_experts=N, heads=H, top_k=K, d_key=DK)
    cfg.update(kw)
    gdef, state = nnx.split(nnx.eval_shape(lambda: PEER(D, rngs=nnx.Rngs(0), **cfg)))
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = [getattr(k, "key", None) for k in path if hasattr(k, "key")][-1]
        base, std = {"mean": (0.0, 0.0), "var": (1.0, 0.0), "scale": (1.0, 0.2), "bias": (0.0, 0.2),
                     "sub_keys": (0.0, 1 / math.sqrt(DK // 2))}.get(name, (0.0, 1 / math.sqrt(D)))
        return jnp.asarray(base + std * rng.standard_normal(leaf.shape), leaf.dtype)

    return nnx.merge(gdef, jax.tree_util.tree_map_with_path(fill, state))


@functools.cache
def _compiled_step(gdef, train: bool):
    def step(state, x, mask):
        m = nnx.merge(gdef, state)

        def loss(m, x):
            y, inter = nnx.capture(m, nnx.Intermediate)(x, mask=mask, train=train)
            return jnp.sum(y.astype(jnp.float32) * COT * mask[..., None]), (y, inter)

        (_, (y, inter)), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
        return y, grads, inter["expert_mass"][0], nnx.state(m, nnx.BatchStat)

    return jax.jit(step)


def run(model: PEER, x, mask, *, train: bool):
    """One jitted forward+backward: (y, grads wrt (params, x), sown mass, new batch stats).

    The loss ignores padded positions, as an LM loss does. Compiled once per configuration
    (graphdef) and mode, and shared between tests.
    """
    gdef, state = nnx.split(model)
    return _compiled_step(gdef, train)(state, x, mask)


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- numpy reference


def np_gelu(a):
    return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))


def np_peer(model: PEER, x, *, act):
    """The paper's formula in float64 with brute-force top-k over all N keys (eval mode)."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(model)))
    x = np.asarray(x, np.float64)
    r = p["router"]
    q = x @ r["query"]
    if model.router.query_bn is not None:
        bn = r["query_bn"]
        q = (q - bn["mean"]) / np.sqrt(bn["var"] + model.router.query_bn.epsilon) * bn["scale"] + bn["bias"]
    q = q.reshape(*x.shape[:-1], model.heads, model.router.d_key)
    sk = r["sub_keys"]
    n, half = sk.shape[-2:]
    left = np.broadcast_to(sk[..., 0, :, None, :], (*sk.shape[:-3], n, n, half))
    right = np.broadcast_to(sk[..., 1, None, :, :], (*sk.shape[:-3], n, n, half))
    keys = np.concatenate([left, right], -1).reshape(*sk.shape[:-3], n * n, 2 * half)
    scores = np.einsum("...hc,hnc->...hn" if keys.ndim == 3 else "...hc,nc->...hn", q, keys)
    idx = np.argsort(-scores, axis=-1)[..., : model.top_k]
    s = np.take_along_axis(scores, idx, -1)
    if model.router.score_fn == "softmax":
        g = np.exp(s - s.max(-1, keepdims=True))
        g /= g.sum(-1, keepdims=True)
    else:
        g = 1 / (1 + np.exp(-s))
    u, v = p["u"][idx], p["v"][idx]  # [B, T, h, k, d]
    hidden = act(np.einsum("btd,bthkd->bthk", x, u))
    return np.einsum("bthk,bthkd->btd", g * hidden, v), idx, g


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "kw,act",
    [
        (dict(), np_gelu),
        (dict(activation="relu", score_fn="sigmoid", query_batchnorm=False, per_head_keys=True), lambda a: np.maximum(a, 0)),
    ],
    ids=["paper", "relu-sigmoid-noBN-perhead"],
)
def test_matches_reference_formula(kw, act):
    model = make(compute="efficient", **kw)
    bn = model.router.query_bn
    if bn is not None:  # non-trivial running statistics
        bn.mean[...] = jnp.linspace(-0.3, 0.3, H * DK)
        bn.var[...] = jnp.linspace(0.5, 2.0, H * DK)
    y, _, mass, stats = run(model, X, MASK, train=False)
    ref, idx, g = np_peer(model, X, act=act)
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    # Sown statistics: router mass per expert over valid tokens only.
    w = np.asarray(g) * np.asarray(MASK)[..., None, None]
    ref_mass = np.zeros(N)
    np.add.at(ref_mass, idx.reshape(-1), w.reshape(-1))
    np.testing.assert_allclose(mass, ref_mass, rtol=RTOL, atol=ATOL)
    if model.router.score_fn == "softmax":
        np.testing.assert_allclose(mass.sum(), H * int(MASK.sum()), rtol=RTOL)
    if bn is not None:  # eval leaves running statistics untouched
        assert_trees_close(stats, nnx.state(model, nnx.BatchStat), rtol=0, atol=0)


@pytest.fixture(scope="module")
def naive_and_efficient():
    return {c: run(make(compute=c), X, MASK, train=True) for c in ("naive", "efficient", "native")}


@pytest.mark.parametrize("compute", ["efficient", "native"])
def test_optimised_paths_match_naive(naive_and_efficient, compute):
    """Outputs, grads wrt x, u, v, query kernel, sub-keys and BN params, mass, batch stats."""
    naive, eff = naive_and_efficient["naive"], naive_and_efficient[compute]
    grads = eff[1][0]
    assert {"u", "v", "router"} <= set(grads.keys())
    assert {"sub_keys", "query", "query_bn"} <= set(grads["router"].keys())
    assert float(jnp.abs(grads["u"][...]).max()) > 0 and float(jnp.abs(grads["v"][...]).max()) > 0
    assert_trees_close(eff, naive)


@pytest.mark.parametrize("block,ops", [(1, ("efficient", "portable")), (5, ("efficient", "portable")),
                                       (12, ("efficient", "portable")), (1, ("efficient", "cpu")),
                                       (1, ("native", "cpu"))],
                         ids=["xla-block1", "xla-block5", "xla-block12", "xla-cpu", "native"])
def test_primitives_match_naive(block, ops):
    """The custom-VJP gather_dot / embedding_bag of each backend's ops vs plain autodiff, with
    repeated indices and ragged blocks; `native`: the same custom_vjp with the C++ kernels of
    peer_jax.native as its loops."""
    from peer_jax import backends

    ops = backends.OPS[ops]
    rng = np.random.default_rng(block)
    m, s, n_rows, d = 7, 12, 5, 6  # 5 rows for 84 slots: many duplicate indices
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((n_rows, d)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, n_rows, (m, s)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((m, s)), jnp.float32)
    blk = ec.slot_block(s, block)

    f32 = np.dtype(np.float32)

    def loss(x, table, w):
        return (jnp.sum(ops.gather_dot(x, table, idx, dtype=f32, block=blk) * w)
                + jnp.sum(ops.embedding_bag(table, idx, w, dtype=f32, block=blk) * x))

    def loss_naive(x, table, w):
        return jnp.sum(ec.expert_dot_naive(x, table, idx) * w) + jnp.sum(ec.embedding_bag_naive(table, idx, w) * x)

    eff, naive = jax.jit(
        lambda: [
            (ops.gather_dot(x, table, idx, dtype=f32, block=blk),
             ops.embedding_bag(table, idx, w, dtype=f32, block=blk),
             jax.grad(loss, argnums=(0, 1, 2))(x, table, w)),
            (ec.expert_dot_naive(x, table, idx), ec.embedding_bag_naive(table, idx, w),
             jax.grad(loss_naive, argnums=(0, 1, 2))(x, table, w)),
        ]
    )()
    assert_trees_close(eff, naive)


def test_chunked_routing_matches_unchunked(naive_and_efficient):
    """route_chunk_tokens=2 (one position per lax.map step here, B = 2) == no chunking (the
    default 512 exceeds these B·T = 10 tokens): outputs, all gradients, sown mass and batch
    statistics."""
    chunked = run(make(compute="efficient", route_chunk_tokens=2), X, MASK, train=True)
    assert_trees_close(chunked, naive_and_efficient["efficient"])
    assert_trees_close(chunked, naive_and_efficient["naive"])


@pytest.mark.parametrize("transposed_grad", [False, True])
def test_project_vjp_matches_autodiff(transposed_grad):
    """The CPU backend's query projection (custom VJP) == the portable one (autodiff of the plain
    einsum) == x @ w, in both forms of the kernel gradient."""
    from peer_jax.backends import cpu, portable

    cpu_project = cpu.project_transposed_grad if transposed_grad else cpu.project

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)

    def value_and_grads(project):
        return project(x, w), jax.grad(lambda x, w: jnp.sum(project(x, w) * ct), argnums=(0, 1))(x, w)

    got, want, plain = jax.jit(lambda: (
        value_and_grads(cpu_project), value_and_grads(portable.project),
        (x @ w, jax.grad(lambda x, w: jnp.sum((x @ w) * ct), argnums=(0, 1))(x, w)),
    ))()
    assert_trees_close(got, want)
    assert_trees_close(want, plain)


def test_k1_is_dynamic_mlp():
    """With top_k = 1 (softmax weight 1), PEER is an MLP whose h hidden units are the
    retrieved experts: y = Σ_h σ(u_{i_h}ᵀx) v_{i_h}."""
    model = make(top_k=1, compute="efficient")
    y, idx = jax.jit(lambda m, x: (m(x), m.router(x)[1]))(model, X)
    assert not nnx.state(model, nnx.Intermediate)  # no sow outside nnx.capture
    idx = np.asarray(idx)[..., 0]  # [B, T, h]
    u, v = np.asarray(model.u[...]), np.asarray(model.v[...])
    x = np.asarray(X)
    for b in range(B):
        for t in range(T):
            w_in, w_out = u[idx[b, t]], v[idx[b, t]]  # [h, d]: the assembled MLP
            ref = np_gelu(w_in @ x[b, t]) @ w_out
            np.testing.assert_allclose(y[b, t], ref, rtol=RTOL, atol=ATOL)


def _np_masked_stats(model: PEER, x, mask):
    q = np.asarray(x, np.float64) @ np.asarray(model.router.query[...], np.float64)
    valid = q[np.asarray(mask)]
    return valid.mean(0), valid.var(0)


def test_batchnorm_uses_only_valid_tokens(naive_and_efficient):
    """Train mode: running stats move toward mean/var over valid tokens only, and padded
    tokens' contents change neither the outputs of valid tokens nor (with a masked loss) any
    gradient."""
    model = make(compute="efficient")
    mom = model.router.query_bn.momentum
    mean, var = _np_masked_stats(model, X, MASK)
    stats = naive_and_efficient["efficient"][3]
    np.testing.assert_allclose(stats["router"]["query_bn"]["mean"][...], (1 - mom) * mean, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(stats["router"]["query_bn"]["var"][...], mom + (1 - mom) * var, rtol=1e-6, atol=1e-8)

    garbage = jnp.asarray(np.random.default_rng(5).standard_normal(X.shape) * 100, jnp.float32)
    x2 = jnp.where(MASK[..., None], X, garbage)
    y2, (g2, gx2), mass2, stats2 = run(model, x2, MASK, train=True)
    y1, (g1, gx1), mass1, stats1 = naive_and_efficient["efficient"]
    valid = np.asarray(MASK)
    np.testing.assert_allclose(np.asarray(y2)[valid], np.asarray(y1)[valid], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(gx2)[valid], np.asarray(gx1)[valid], rtol=RTOL, atol=ATOL)
    assert_trees_close((mass2, stats2, g2), (mass1, stats1, g1))


def test_eval_mode_is_per_token(naive_and_efficient):
    """Eval uses running statistics: a token's output does not depend on its batch-mates,
    whereas in training (batch statistics) it does."""
    model = make(compute="efficient")
    x2 = X.at[1].set(X[1] * 3.0 + 1.0)
    e1, e2 = run(model, X, MASK, train=False)[0], run(model, x2, MASK, train=False)[0]
    np.testing.assert_array_equal(e1[0], e2[0])
    t1, t2 = naive_and_efficient["efficient"][0], run(model, x2, MASK, train=True)[0]
    assert not np.allclose(t1[0], t2[0], rtol=1e-3, atol=1e-3)


def test_all_padding_batch_keeps_stats_finite():
    model = make(compute="efficient")
    y, _, mass, stats = run(model, X, jnp.zeros((B, T), bool), train=True)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves((y, stats)))
    assert float(mass.sum()) == 0.0


def test_real_init_and_dtypes():
    """The real initialisers; bf16 compute with f32 params; output in x.dtype."""
    model = PEER(D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK, dtype=jnp.bfloat16)
    params = nnx.state(model, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    np.testing.assert_allclose(np.std(model.u[...]), 1 / math.sqrt(D), rtol=0.1)
    np.testing.assert_allclose(np.std(model.router.sub_keys[...]), 1 / math.sqrt(DK // 2), rtol=0.2)
    y32, y16 = jax.jit(lambda m, a, b: (m(a), m(b)))(model, X, X.astype(jnp.bfloat16))
    assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(y32)).all() and np.isfinite(np.asarray(y16, np.float32)).all()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_experts=60), "num_experts=60 must be a perfect square"),
        (dict(d_key=7), "d_key=7 must be a positive even"),
        (dict(top_k=9), r"top_k=9 must be between 1 and √num_experts=8"),
        (dict(top_k=0), "top_k=0"),
        (dict(heads=0), "heads=0 must be ≥ 1"),
        (dict(activation="swish"), "activation='swish' is unknown"),
        (dict(score_fn="relu"), "score_fn='relu' is unknown"),
        (dict(compute="fast"), "compute='fast' is unknown"),
        (dict(compute="native", dtype=jnp.bfloat16), "compute='native' supports float32 only"),
        (dict(slot_block=0), "slot_block=0"),
        (dict(route_chunk_tokens=0), "route_chunk_tokens=0"),
    ],
)
def test_invalid_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_wrong_input_shape():
    with pytest.raises(ValueError, match=r"\[B, T, 16\]"):
        make()(jnp.zeros((2, 3, 8)))


# ----------------------------------------------------------------------------- expert_stats


def test_expert_stats():
    n = 16
    uniform = jnp.full((n,), 2.5)
    one_hot = jnp.zeros((n,)).at[3].set(7.0)
    half = jnp.zeros((n,)).at[: n // 2].set(1.0)
    got = jax.jit(
        lambda: [f(m) for m in (uniform, one_hot, half) for f in (expert_stats.usage, expert_stats.unevenness)]
    )()
    np.testing.assert_allclose(got, [1.0, 0.0, 1 / n, math.log(n), 0.5, math.log(2)], rtol=1e-6, atol=1e-6)


def test_sub_key_usage_and_summary():
    """Experts a·n + b: a dead first-half sub-key kills a row of the [n, n] mass, a dead
    second-half one a column; usage is then bounded by the product of the two shares."""
    n = 4
    mass = np.ones((n, n), np.float32)
    mass[1, :] = 0  # first-half sub-key 1 never used
    mass[:, 2:] = 0  # second-half sub-keys 2 and 3 never used
    rows, cols = expert_stats.sub_key_usage(jnp.asarray(mass.reshape(-1)))
    assert (float(rows), float(cols)) == (0.75, 0.5)
    got = expert_stats.summary(mass.reshape(-1))
    assert got == {"usage": 0.375, "unevenness": pytest.approx(math.log(16 / 6)), "key_usage_1": 0.75,
                   "key_usage_2": 0.5}
    assert set(expert_stats.summary(np.ones(12, np.float32))) == {"usage", "unevenness"}  # not n²: no key usage


def test_efficient_does_not_keep_gathered_rows():
    """Compiled fwd+bwd temp memory: naive holds ≥ 2·tokens·h·k·d floats (both gathers, kept
    for backward); efficient stays below one such tensor (compile only, nothing allocated)."""
    d, m_tokens, heads, top_k = 128, 1024, 4, 8

    def temp_bytes(compute):
        abstract = nnx.eval_shape(
            lambda: PEER(d, rngs=nnx.Rngs(0), num_experts=32**2, heads=heads, top_k=top_k, d_key=16, compute=compute)
        )
        gdef, state = nnx.split(abstract)

        def step(state, x):
            m = nnx.merge(gdef, state)
            return nnx.grad(lambda m, x: jnp.sum(m(x, train=True) ** 2), argnums=(0, 1))(m, x)

        x = jax.ShapeDtypeStruct((4, m_tokens // 4, d), jnp.float32)
        return jax.jit(step).lower(state, x).compile().memory_analysis().temp_size_in_bytes

    gathered = m_tokens * heads * top_k * d * 4
    naive, eff = temp_bytes("naive"), temp_bytes("efficient")
    print(f"temp bytes: naive {naive}, efficient {eff}, one gathered tensor {gathered}")
    assert naive >= 2 * gathered
    assert eff < gathered
