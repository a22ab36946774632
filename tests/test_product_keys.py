"""Product-key top-k: equal to brute force over all n² keys (ties aside), in f32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peer_jax.layers.product_keys import (
    brute_force_scores,
    brute_force_topk,
    candidate_pairs,
    full_keys,
    product_key_topk,
)


def _inputs(seed, lead, heads, n, d_key, dtype, per_head):
    """numpy-generated inputs (eager jax.random would compile per op; tests must stay fast)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*lead, heads, d_key), np.float32)
    shape = (heads, 2, n, d_key // 2) if per_head else (2, n, d_key // 2)
    return jnp.asarray(q, dtype), jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def np_full_keys(keys):
    keys = np.asarray(keys, np.float64)
    c1, c2 = keys[..., 0, :, :], keys[..., 1, :, :]
    n, half = c1.shape[-2:]
    left = np.broadcast_to(c1[..., :, None, :], (*c1.shape[:-2], n, n, half))
    right = np.broadcast_to(c2[..., None, :, :], (*c1.shape[:-2], n, n, half))
    return np.concatenate([left, right], -1).reshape(*c1.shape[:-2], n * n, 2 * half)


def np_brute_scores(q, keys):
    """float64 scores of every query against every key: the ground truth."""
    fk, q = np_full_keys(keys), np.asarray(q, np.float64)
    return np.einsum("...hc,hnc->...hn" if fk.ndim == 3 else "...hc,nc->...hn", q, fk)


def _check_against_brute_force(q, keys, top_k, scores, idx, *, rtol, atol):
    """Valid, unique indices whose true scores are ours and form the true top-k values."""
    n2 = keys.shape[-2] ** 2
    brute = np_brute_scores(q, keys)
    scores, idx = np.asarray(scores, np.float64), np.asarray(idx)
    assert idx.dtype == np.int32 and scores.shape == idx.shape == (*q.shape[:-1], top_k)
    assert ((idx >= 0) & (idx < n2)).all()
    flat_idx = idx.reshape(-1, top_k)
    assert all(len(set(row)) == top_k for row in flat_idx), "duplicate items in a top-k"
    assert (np.diff(scores, axis=-1) <= 0).all(), "scores not sorted descending"
    # Our score of each returned item is its true score ...
    np.testing.assert_allclose(np.take_along_axis(brute, idx, -1), scores, rtol=rtol, atol=atol)
    # ... and the returned scores are the true top-k values (whatever items tie for them).
    order = np.argsort(-brute, axis=-1, kind="stable")
    sorted_all = np.take_along_axis(brute, order, -1)
    np.testing.assert_allclose(scores, sorted_all[..., :top_k], rtol=rtol, atol=atol)
    # Where the k-th and (k+1)-th true scores are clearly apart, the item sets are identical.
    sorted_all, order = sorted_all.reshape(-1, n2), order.reshape(-1, n2)
    gap = sorted_all[:, top_k - 1] - sorted_all[:, top_k] if top_k < n2 else np.full(len(order), np.inf)
    clear = gap > 1e-3 * np.maximum(1.0, np.abs(sorted_all[:, top_k - 1]))
    assert clear.mean() > 0.5  # the check below must not be vacuous
    for row in np.nonzero(clear)[0]:
        assert set(flat_idx[row]) == set(order[row, :top_k])


CASES = [
    # n, top_k, heads, d_key, dtype, per_head
    (4, 1, 1, 4, jnp.float32, False),
    (8, 3, 2, 8, jnp.float32, False),
    (16, 4, 3, 16, jnp.float32, False),
    (8, 8, 2, 8, jnp.float32, False),  # top_k = n: every candidate of one half survives
    (16, 5, 2, 8, jnp.float32, True),
    (16, 4, 2, 16, jnp.bfloat16, False),
    (8, 4, 2, 8, jnp.bfloat16, True),
]


@pytest.mark.parametrize("n,top_k,heads,d_key,dtype,per_head", CASES)
def test_matches_brute_force(n, top_k, heads, d_key, dtype, per_head):
    q, keys = _inputs(n * 100 + top_k, (3, 5), heads, n, d_key, dtype, per_head)
    scores, idx = jax.jit(product_key_topk, static_argnums=2)(q, keys, top_k)
    assert scores.dtype == jnp.float32
    # bf16 inputs: products are exact in f32, so only f32 summation order differs.
    _check_against_brute_force(q, keys, top_k, scores, idx, rtol=1e-5, atol=1e-5)


def test_exact_ties_bf16():
    """Integer-valued bf16 keys and queries make many exactly equal scores; any tied item is
    acceptable, but values must be exact and items unique."""
    n, top_k, heads, d_key = 8, 6, 2, 4
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.integers(-1, 2, (4, heads, d_key)), jnp.bfloat16)
    keys = jnp.asarray(rng.integers(-1, 2, (2, n, d_key // 2)), jnp.bfloat16)
    scores, idx = jax.jit(product_key_topk, static_argnums=2)(q, keys, top_k)
    brute = np_brute_scores(q, keys)
    np.testing.assert_array_equal(np.take_along_axis(brute, np.asarray(idx), -1), scores)
    np.testing.assert_array_equal(-np.sort(-brute, -1)[..., :top_k], scores)
    assert all(len(set(r)) == top_k for r in np.asarray(idx).reshape(-1, top_k))


def test_jax_brute_force_reference():
    """The in-library brute force (full_keys layout a·n + b included) agrees with numpy's."""
    q, keys = _inputs(5, (4,), 2, 4, 6, jnp.float32, False)
    fk, scores, (top_s, top_i) = jax.jit(
        lambda q, k: (full_keys(k), brute_force_scores(q, k), brute_force_topk(q, k, 3))
    )(q, keys)
    k_np = np.asarray(keys)
    np.testing.assert_array_equal(fk[2 * 4 + 3], np.concatenate([k_np[0, 2], k_np[1, 3]]))
    np.testing.assert_allclose(scores, np_brute_scores(q, keys), rtol=1e-5, atol=1e-5)
    _check_against_brute_force(q, keys, 3, top_s, top_i, rtol=1e-5, atol=1e-5)


def test_gradients_match_brute_force():
    """d(Σ w·scores) wrt queries and sub-keys equals the brute-force top-k's (no ties in f32)."""
    n, top_k, heads, d_key = 8, 4, 2, 8
    q, keys = _inputs(7, (6,), heads, n, d_key, jnp.float32, False)
    w = jnp.asarray(np.random.default_rng(8).standard_normal((6, heads, top_k)), jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k: jnp.sum(w * fn(q, k, top_k)[0]), argnums=(0, 1))(q, keys)

    g_pk, g_bf = jax.jit(lambda: (grads(product_key_topk), grads(brute_force_topk)))()
    for a, b in zip(g_pk, g_bf):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_approx_topk_is_consistent():
    """approx_max_k may miss items (so no equality), but whatever it returns is self-consistent."""
    n, top_k, heads, d_key = 16, 4, 2, 8
    q, keys = _inputs(11, (5,), heads, n, d_key, jnp.float32, False)
    scores, idx = jax.jit(lambda q, k: product_key_topk(q, k, top_k, approx=True))(q, keys)
    brute = np_brute_scores(q, keys)
    np.testing.assert_allclose(np.take_along_axis(brute, np.asarray(idx), -1), scores, rtol=1e-5, atol=1e-5)
    assert (np.diff(np.asarray(scores), axis=-1) <= 0).all()


@pytest.mark.parametrize(
    "q_shape,k_shape,top_k,match",
    [
        ((2, 2, 7), (2, 4, 3), 2, "even"),
        ((2, 2, 8), (2, 4, 4), 5, "top_k=5"),
        ((2, 2, 8), (3, 4, 4), 2, "does not match"),
        ((2, 2, 8), (2, 4, 3), 2, "does not match"),
        ((2, 3, 8), (2, 2, 4, 4), 2, "heads"),
        ((2, 2, 8), (4, 4), 2, "sub_keys must be"),
    ],
)
def test_shape_errors(q_shape, k_shape, top_k, match):
    with pytest.raises(ValueError, match=match):
        product_key_topk(jnp.zeros(q_shape), jnp.zeros(k_shape), top_k)


def test_candidate_pairs_are_the_down_closed_triangle():
    ci, cj = candidate_pairs(16)
    assert len(ci) == 50 and len(candidate_pairs(32)[0]) == 119  # Σ_i ⌊k/(i+1)⌋
    assert ((ci + 1) * (cj + 1) <= 16).all() and len(set(zip(ci.tolist(), cj.tolist()))) == 50


@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_pruned_candidates_keep_the_top_k_values(k):
    """Adversarial: sorted half scores with many exact ties (small integers). The top-k values
    over the pruned pairs equal those over all k² sums."""
    rng = np.random.default_rng(k)
    s1 = -np.sort(-rng.integers(-3, 4, (500, k)).astype(np.float32), -1)
    s2 = -np.sort(-rng.integers(-3, 4, (500, k)).astype(np.float32), -1)
    full = np.sort((s1[:, :, None] + s2[:, None, :]).reshape(500, -1), -1)[:, ::-1][:, :k]
    ci, cj = candidate_pairs(k)
    pruned = np.sort(s1[:, ci] + s2[:, cj], -1)[:, ::-1][:, :k]
    np.testing.assert_array_equal(pruned, full)


@pytest.mark.parametrize("per_head", [False, True])
def test_chunked_equals_unchunked(per_head):
    """chunk_tokens splits axis -3 (sequence) into lax.map steps, padding the last one:
    identical scores and indices; gradients equal up to float summation order (the key
    gradient is accumulated chunk by chunk)."""
    q, keys = _inputs(21, (2, 7), 3, 8, 8, jnp.float32, per_head)  # [B=2, T=7, h=3, d_key=8]
    w = jnp.asarray(np.random.default_rng(22).standard_normal((2, 7, 3, 4)), jnp.float32)

    def run(chunk):
        def loss(q, k):
            s, _ = product_key_topk(q, k, 4, chunk_tokens=chunk)
            return jnp.sum(w * s)

        return product_key_topk(q, keys, 4, chunk_tokens=chunk), jax.grad(loss, argnums=(0, 1))(q, keys)

    (ref, ref_g), (got, got_g), (got3, got3_g) = jax.jit(lambda: (run(None), run(4), run(6)))()
    np.testing.assert_array_equal(got[1], ref[1])  # chunks of 2 positions: 4 steps, last padded
    np.testing.assert_array_equal(got3[1], ref[1])  # chunks of 3 positions: 3 steps, last padded
    for a, b in zip(jax.tree.leaves((got[0], got_g, got3[0], got3_g)), jax.tree.leaves((ref[0], ref_g, ref[0], ref_g))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


F32_CASES = [c for c in CASES if c[4] == jnp.float32]


@pytest.mark.parametrize("n,top_k,heads,d_key,dtype,per_head", F32_CASES)
def test_native_equals_xla_path_values_and_gradients(n, top_k, heads, d_key, dtype, per_head):
    """The CPU backend's native selection (C++ kernel, sparse custom VJP) == the jnp path:
    identical scores and items, and gradients wrt queries and sub-keys (shared and per-head keys)."""
    from peer_jax import native
    from peer_jax.backends import cpu

    if not native.available():
        pytest.skip("no C++ compiler: compute='native' unavailable")
    q, keys = _inputs(n * 100 + top_k + 7, (3, 5), heads, n, d_key, dtype, per_head)
    w = jnp.asarray(np.random.default_rng(n).standard_normal((3, 5, heads, top_k)), jnp.float32)

    def run(select):
        def loss(q, k):
            return jnp.sum(w * select(q, k, top_k)[0])

        return select(q, keys, top_k), jax.grad(loss, argnums=(0, 1))(q, keys)

    (ref, ref_g), (got, got_g) = jax.jit(lambda: (run(product_key_topk), run(cpu.select_topk)))()
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    _check_against_brute_force(q, keys, top_k, *got, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_native_ties_follow_lax_top_k():
    """Integer-valued scores (massive ties): the C++ selection returns exactly lax.top_k's
    order (lower position first among equals), chunked or not."""
    from peer_jax import native
    from peer_jax.backends import cpu

    if not native.available():
        pytest.skip("no C++ compiler: compute='native' unavailable")
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.integers(-1, 2, (2, 6, 2, 4)), jnp.float32)
    keys = jnp.asarray(rng.integers(-1, 2, (2, 8, 2)), jnp.float32)
    ref, got, got_chunked = jax.jit(lambda: (product_key_topk(q, keys, 6), cpu.select_topk(q, keys, 6),
                                             cpu.select_topk(q, keys, 6, chunk_tokens=4)))()
    for g in (got, got_chunked):
        np.testing.assert_array_equal(g[0], ref[0])
        np.testing.assert_array_equal(g[1], ref[1])


# ----------------------------------------------------------------------------- routing reach check


def test_routing_reach_counts_reached_experts_and_dependent_halves():
    """peer_jax.routing_reach (scripts/routing_reach.py): usage is the share of items in some
    exact top-k (checked against the brute-force top-k), and a query whose second half copies its
    first reaches fewer pairs than the same halves paired at random."""
    from peer_jax import routing_reach

    rng = np.random.default_rng(0)
    n, half, heads, top_k = 8, 3, 2, 2
    sub_keys = rng.standard_normal((2, n, half)).astype(np.float32)
    q1 = rng.standard_normal((400, heads, half)).astype(np.float32)
    q = np.concatenate([q1, q1], axis=-1)  # q₂ = q₁: fully dependent halves
    x = rng.standard_normal((400, 4))
    rep = routing_reach.layer_report(x, q, sub_keys, top_k)
    _, idx = brute_force_topk(jnp.asarray(q), jnp.asarray(sub_keys), top_k)
    hit = np.zeros(n * n, bool)
    hit[np.asarray(idx).reshape(-1)] = True
    assert rep["usage"] == hit.mean()
    assert rep["half_usage"] == [hit.reshape(n, n).any(1).mean(), hit.reshape(n, n).any(0).mean()]
    assert rep["q2_from_q1_r2"] == pytest.approx(1.0)
    assert rep["usage_halves_shuffled"] > rep["usage"]
