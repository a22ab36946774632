"""Product-key top-k retrieval (Lample et al. 2019), as used by PEER and PKM.

Every item ``i = a·n + b`` (``0 ≤ a, b < n``, ``N = n²`` items) owns the key ``[c_a ; c'_b]``
built from two sub-key tables ``C = sub_keys[0]`` and ``C' = sub_keys[1]`` of ``n`` rows and
``d_key/2`` columns. The score of item ``i`` for a query ``q = [q₁ ; q₂]`` separates:
``qᵀ[c_a ; c'_b] = q₁ᵀc_a + q₂ᵀc'_b``. Any item of the overall top-k has its ``a`` in the
top-k of ``q₁ᵀC`` and its ``b`` in the top-k of ``q₂ᵀC'`` (otherwise k better items would share
its other half), so the top-k over the k² candidate sums *is* the exact top-k over all N keys,
at a cost of O((n + k²)·d_key) instead of O(n²·d_key) per query.

Scores are accumulated and returned in float32 whatever the query dtype: they feed a softmax and
a discrete top-k, where bf16 rounding would create spurious ties.

Plain jnp that imports nothing from ``peer_jax``: the backends (``peer_jax/backends``) build
their forms of the selection on these helpers, and the layers reach it through the backends.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def check_shapes(queries: jax.Array, sub_keys: jax.Array, top_k: int) -> tuple[int, bool]:
    """Returns ``(n, per_head)`` after validating shapes; raises ValueError with the fix."""
    if queries.ndim < 2:
        raise ValueError(f"queries must be [..., heads, d_key]; got shape {queries.shape}.")
    heads, d_key = queries.shape[-2:]
    if d_key % 2:
        raise ValueError(f"d_key={d_key} must be even: the query is split into two halves.")
    if sub_keys.ndim == 3:
        per_head = False
        two, n, half = sub_keys.shape
    elif sub_keys.ndim == 4:
        per_head = True
        kh, two, n, half = sub_keys.shape
        if kh != heads:
            raise ValueError(
                f"per-head sub_keys {sub_keys.shape} have {kh} heads but queries have {heads}."
            )
    else:
        raise ValueError(
            f"sub_keys must be [2, n, d_key/2] (shared) or [heads, 2, n, d_key/2] (per head); "
            f"got shape {sub_keys.shape}."
        )
    if two != 2 or half * 2 != d_key:
        raise ValueError(
            f"sub_keys shape {sub_keys.shape} does not match d_key={d_key}: expected "
            f"[..., 2, n, {d_key // 2}]."
        )
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k={top_k} must be in [1, n={n}] (n = sqrt(number of keys)).")
    return n, per_head


def half_scores(q_half: jax.Array, keys_half: jax.Array, per_head: bool) -> jax.Array:
    """``[..., heads, n]`` float32 scores of one query half against one sub-key table."""
    spec = "...hc,hnc->...hn" if per_head else "...hc,nc->...hn"
    return jnp.einsum(spec, q_half, keys_half, preferred_element_type=jnp.float32)


def _top_k(scores: jax.Array, k: int, approx: bool, recall_target: float):
    if approx:
        return jax.lax.approx_max_k(scores, k, recall_target=recall_target)
    return jax.lax.top_k(scores, k)


def product_key_topk(
    queries: jax.Array,
    sub_keys: jax.Array,
    top_k: int,
    *,
    approx: bool = False,
    recall_target: float = 0.95,
    chunk_tokens: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k of ``qᵀ[c_a ; c'_b]`` over all ``n²`` product keys, in plain jnp (the
    portable form of the selection; ``backends/cpu.py`` has a C++ one with the same results).

    Args:
      queries: ``[..., heads, d_key]``.
      sub_keys: ``[2, n, d_key//2]`` shared by all heads (the PEER paper's choice), or
        ``[heads, 2, n, d_key//2]`` for per-head keys (as in PKM / PEER-pytorch).
      top_k: number of items to return per query and head (``≤ n``).
      approx: use ``jax.lax.approx_max_k`` for the two sub-key top-k's (TPU-friendly). The result
        is then **not exact**: a true top-k item whose half misses the approximate half-top-k
        is lost. The final top-k over the k² candidates stays exact. On CPU/GPU XLA falls back
        to an exact sort, so this mainly matters on TPU.
      recall_target: recall target passed to ``approx_max_k``.
      chunk_tokens: see ``by_chunks``.

    Returns:
      ``(scores, indices)``, each ``[..., heads, top_k]``: float32 scores sorted descending and
      int32 item indices ``a·n + b``.
    """
    n, per_head = check_shapes(queries, sub_keys, top_k)
    return by_chunks(lambda q: _product_key_topk(q, sub_keys, top_k, n, per_head, approx, recall_target), queries,
                     chunk_tokens)


def by_chunks(select, queries: jax.Array, chunk_tokens: int | None):
    """``select(queries)`` (a product-key selection, ``[..., heads, d_key] -> ([..., heads, k],
    [..., heads, k])``), run over chunks of the queries when ``chunk_tokens`` is set.

    With ``chunk_tokens`` set and ``queries`` of ≥ 3 dims, about this many queries (positions
    along axis -3 times the leading dims) go through ``select`` per ``lax.map`` step. Same
    results; the ``[tokens, heads, n]`` score arrays and their gradients then exist one chunk at
    a time (cache-resident instead of ``4·heads·n`` floats per token of fresh memory). Axis -3
    (sequence length) is never sharded, so the chunking composes with batch sharding;
    ``chunk_tokens`` counts global tokens (the router scales it by the number of batch shards).
    """
    if chunk_tokens is not None and queries.ndim >= 3:
        lead, t = queries.shape[:-3], queries.shape[-3]
        c = max(1, chunk_tokens // max(1, math.prod(lead)))  # positions per chunk
        if c < t:
            return _chunked(select, queries, c)
    return select(queries)


def _chunked(select, queries, c):
    """``select`` over chunks of ``c`` positions of axis -3 (padded to a multiple)."""
    *lead, t, h, dk = queries.shape
    pad = -t % c
    q = jnp.pad(queries, [(0, 0)] * len(lead) + [(0, pad), (0, 0), (0, 0)]) if pad else queries
    q = jnp.moveaxis(q.reshape(*lead, (t + pad) // c, c, h, dk), -4, 0)
    s, i = jax.lax.map(select, q)
    top_k = s.shape[-1]
    s, i = (jnp.moveaxis(a, 0, -4).reshape(*lead, t + pad, h, top_k)[..., :t, :, :] for a in (s, i))
    return s, i


def _product_key_topk(queries, sub_keys, top_k, n, per_head, approx, recall_target):
    q1, q2, k1, k2, _ = split_halves(queries, sub_keys)
    k1 = k1.astype(queries.dtype)
    k2 = k2.astype(queries.dtype)

    s1, i1 = _top_k(half_scores(q1, k1, per_head), top_k, approx, recall_target)
    s2, i2 = _top_k(half_scores(q2, k2, per_head), top_k, approx, recall_target)
    # Candidate sums s1[i] + s2[j] over the pairs that can reach the top-k (see candidate_pairs).
    ci, cj = candidate_pairs(top_k)
    # All k² sums, then the candidate columns by one static gather. (Slicing s1, s2 per row of
    # the triangle instead would stop XLA:CPU from recognising sort+slice as its TopK kernel:
    # the two half top-k's become full sorts, far slower.)
    full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], top_k * top_k)
    cand = full[..., ci * top_k + cj]
    scores, j = jax.lax.top_k(cand, top_k)
    a = jnp.take_along_axis(i1, jnp.asarray(ci)[j], axis=-1)
    b = jnp.take_along_axis(i2, jnp.asarray(cj)[j], axis=-1)
    return scores, (a * n + b).astype(jnp.int32)


def split_halves(queries, sub_keys):
    """``(q₁, q₂, C, C', per_head)``: the query halves and the two sub-key tables."""
    half = queries.shape[-1] // 2
    per_head = sub_keys.ndim == 4
    k1, k2 = (sub_keys[:, 0], sub_keys[:, 1]) if per_head else (sub_keys[0], sub_keys[1])
    return queries[..., :half], queries[..., half:], k1, k2, per_head


def candidate_pairs(top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(i, j)`` in the two sorted half-top-k lists with ``(i+1)·(j+1) ≤ top_k``.

    With ``s1``, ``s2`` sorted descending, the candidate ``s1[i] + s2[j]`` is ≤ every candidate
    ``s1[i'] + s2[j']`` with ``i' ≤ i, j' ≤ j``: those ``(i+1)·(j+1)`` candidates form a
    down-closed set. The top-k *values* of all k² candidates are therefore taken by a down-closed
    set of k candidates (the strictly larger ones first, then ties), and every member of a
    down-closed set of size k has ``(i+1)·(j+1) ≤ k``. So the top-k over these pairs is exactly
    the top-k over all k² (up to which of equal-scored items is returned) at a fraction of the
    cost: Σ_i ⌊k/(i+1)⌋ ≈ k·ln k pairs, 50 instead of 256 for k = 16, 119 instead of 1024 for 32.
    Ordered by i, then j (the column order in which ``product_key_topk`` gathers them).
    """
    pairs = [(i, j) for i in range(top_k) for j in range(top_k // (i + 1))]
    ci, cj = (np.asarray(v, np.int32) for v in zip(*pairs))
    return ci, cj


def full_keys(sub_keys: jax.Array) -> jax.Array:
    """All ``n²`` keys ``[c_a ; c'_b]`` in item order ``a·n + b``: ``[(heads,) n², d_key]``."""
    c1, c2 = sub_keys[..., 0, :, :], sub_keys[..., 1, :, :]
    n, half = c1.shape[-2:]
    batch = c1.shape[:-2]
    left = jnp.broadcast_to(c1[..., :, None, :], (*batch, n, n, half))
    right = jnp.broadcast_to(c2[..., None, :, :], (*batch, n, n, half))
    return jnp.concatenate([left, right], axis=-1).reshape(*batch, n * n, 2 * half)


def brute_force_scores(queries: jax.Array, sub_keys: jax.Array) -> jax.Array:
    """Reference: float32 scores of every query against all ``n²`` keys, ``[..., heads, n²]``."""
    check_shapes(queries, sub_keys, 1)
    keys = full_keys(sub_keys).astype(queries.dtype)
    spec = "...hc,hnc->...hn" if sub_keys.ndim == 4 else "...hc,nc->...hn"
    return jnp.einsum(spec, queries, keys, preferred_element_type=jnp.float32)


def brute_force_topk(
    queries: jax.Array, sub_keys: jax.Array, top_k: int
) -> tuple[jax.Array, jax.Array]:
    """Reference top-k over all ``n²`` keys (O(n²·d_key) per query; tests only)."""
    check_shapes(queries, sub_keys, top_k)
    scores, idx = jax.lax.top_k(brute_force_scores(queries, sub_keys), top_k)
    return scores, idx.astype(jnp.int32)
