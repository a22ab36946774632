"""Gather-and-compute primitives for tables of tiny experts / memories (PEER, PKM).

Three operations on a table ``T: [N, d]`` and per-token slot indices ``idx: [M, S]`` close the
forward and backward passes of PEER and PKM:

* ``expert_dot(x, T, idx)[m, s]      = ⟨x[m], T[idx[m, s]]⟩``            (PEER's ``u_iᵀx``)
* ``embedding_bag(T, idx, w)[m]      = Σ_s w[m, s] · T[idx[m, s]]``     (PEER's ``Σ g·σ·v_i``, PKM)
* ``scatter_outer(idx, w, y, N)[n]   = Σ_{idx[m,s]=n} w[m, s] · y[m]``   (their table gradients)

Each is the transpose of another: ``d expert_dot / dx`` is an embedding bag with the output
cotangent as weights, ``d embedding_bag / dw`` is an expert dot, and both table gradients are
scatter-outers. So a ``jax.custom_vjp`` over the first two, written with the three loops below,
never materialises the ``[M, S, d]`` gathered rows that plain autodiff of ``T[idx]`` keeps for the
backward pass (2·h·k·d values per token for PEER: 2 GiB at 4096 tokens, h·k=128, d=512).

The loops walk the S slots ``block`` at a time (``lax.scan``), so peak temporary memory is
``M · block · d`` instead of ``M · S · d``; the table gradient is one ``[N, d]`` accumulator
updated in place by scatter-add. Residuals saved for the backward pass are only the inputs
(``x``, tables, ``idx``, weights), which are alive anyway. Second derivatives are not
supported (the backward loops are not themselves differentiable by design).

The ``*_naive`` functions are the plain-autodiff references that tests compare against.

The loops themselves come in a backend's form (``Kernels``, a non-differentiable argument of the
two custom VJPs): the XLA loops below (``backends/portable.py``; ``backends/cpu.py`` pairs them
with a zero accumulator XLA:CPU cannot merge), or the C++ kernels of ``peer_jax.native``
(``compute="native"``: CPU, float32; expert-centric: the table is walked row by row and every
(token, slot) pair routed to a row is handled there). A layer reaches these functions through
its ``backends.ops(...)``; this module imports no backend.

Dtypes: rows are gathered from the table in its (parameter) dtype and cast to the compute
``dtype`` per block, never the whole table — casting a 1M×1024 table to bf16 on every call
would cost as much memory as the table. Dot products and bag sums accumulate in float32.

All functions also work inside ``jax.shard_map``: loop carries are created with the
varying-manual-axes type of their inputs (``sharding.vary_like``), so the scan type-checks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from peer_jax.sharding import vary_like

DTypeLike = jnp.dtype | type | str


# ----------------------------------------------------------------------------- helpers


def slot_block(num_slots: int, block: int) -> int:
    """Largest divisor of ``num_slots`` that is ≤ ``block`` (so blocks tile the slots)."""
    block = max(1, min(block, num_slots))
    while num_slots % block:
        block -= 1
    return block


def _blocked(a: jax.Array, block: int) -> jax.Array:
    """``[M, S, ...] -> [S/block, M, block, ...]`` for scanning over slot blocks."""
    m, s = a.shape[:2]
    return jnp.swapaxes(a.reshape(m, s // block, block, *a.shape[2:]), 0, 1)


def _unblocked(a: jax.Array) -> jax.Array:
    """Inverse of ``_blocked``."""
    nb, m, block = a.shape[:3]
    return jnp.swapaxes(a, 0, 1).reshape(m, nb * block, *a.shape[3:])


def gather_rows(table: jax.Array, idx: jax.Array, dtype: DTypeLike) -> jax.Array:
    """``table[idx]`` cast to ``dtype``; indices are trusted to be in range."""
    rows = table.at[idx].get(mode="promise_in_bounds", wrap_negative_indices=False)
    return rows.astype(dtype)


# ----------------------------------------------------------------------------- loops
# Non-differentiable building blocks; the custom_vjp functions below define the derivatives.
# `groups` (the row grouping of native kernels) is unused by these XLA forms.


def dot_loop(x: jax.Array, table: jax.Array, idx: jax.Array, dtype, block: int, groups=None) -> jax.Array:
    """float32 ``[M, S]``: ``⟨x[m], table[idx[m, s]]⟩``, ``block`` slots at a time."""
    del groups
    xc = x.astype(dtype)

    def body(_, idx_b):
        rows = gather_rows(table, idx_b, dtype)  # [M, block, d]
        return None, jnp.einsum("md,mbd->mb", xc, rows, preferred_element_type=jnp.float32)

    _, out = jax.lax.scan(body, None, _blocked(idx, block))
    return _unblocked(out)


def bag_loop(table: jax.Array, idx: jax.Array, w: jax.Array, dtype, block: int, groups=None) -> jax.Array:
    """float32 ``[M, d]``: ``Σ_s w[m, s] · table[idx[m, s]]``, ``block`` slots at a time."""
    del groups
    m, d = idx.shape[0], table.shape[-1]

    def body(acc, xs):
        idx_b, w_b = xs
        rows = gather_rows(table, idx_b, dtype)
        return acc + jnp.einsum(
            "mb,mbd->md", w_b.astype(dtype), rows, preferred_element_type=jnp.float32
        ), None

    init = vary_like(jnp.zeros((m, d), jnp.float32), table, idx, w)
    acc, _ = jax.lax.scan(body, init, (_blocked(idx, block), _blocked(w, block)))
    return acc


def scatter_loop(idx: jax.Array, w: jax.Array, y: jax.Array, num_rows: int, out_dtype, block: int, *,
                 zeros: Callable) -> jax.Array:
    """``[num_rows, d]`` in ``out_dtype``: ``Σ_{idx[m,s]=n} w[m, s] · y[m]`` by scatter-add into
    ``zeros(shape, dtype, tag)`` (the backend's zero accumulator; ``tag`` is ``w``)."""
    yf = y.astype(jnp.float32)

    def body(acc, xs):
        idx_b, w_b = xs
        upd = (w_b.astype(jnp.float32)[:, :, None] * yf[:, None, :]).astype(out_dtype)
        acc = acc.at[idx_b].add(upd, mode="promise_in_bounds", wrap_negative_indices=False)
        return acc, None

    init = vary_like(zeros((num_rows, y.shape[-1]), out_dtype, w), idx, w, y)
    acc, _ = jax.lax.scan(body, init, (_blocked(idx, block), _blocked(w, block)))
    return acc


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One backend's form of the three loops under ``expert_dot`` and ``embedding_bag``.

    ``dot(x, table, idx, dtype, block, groups)``, ``bag(table, idx, w, dtype, block, groups)`` and
    ``scatter(idx, w, y, num_rows, out_dtype, block, groups)`` compute what ``dot_loop``,
    ``bag_loop`` and ``scatter_loop`` compute. ``group_by_row(idx, num_rows)``, if set, is
    computed once in each custom VJP's forward pass and handed to all three (the native kernels'
    row grouping); otherwise ``groups`` is None. Frozen and built from module-level functions,
    so it is hashable: a static argument of the custom VJPs.
    """

    dot: Callable
    bag: Callable
    scatter: Callable
    group_by_row: Callable | None = None

    def groups(self, idx: jax.Array, num_rows: int):
        return None if self.group_by_row is None else self.group_by_row(idx, num_rows)


# ----------------------------------------------------------------------------- custom_vjp ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def expert_dot(x: jax.Array, table: jax.Array, idx: jax.Array, dtype, block: int, kernels: Kernels):
    """float32 ``[M, S]`` of ``⟨x[m], table[idx[m, s]]⟩`` without keeping gathered rows.

    ``x: [M, d]``, ``table: [N, d]``, ``idx: [M, S]`` int32. ``dtype`` is the compute dtype of
    the products (a ``np.dtype``; accumulation is float32); ``block`` slots are gathered per loop
    step (it must divide S; see ``slot_block``); ``kernels``: the loops' form (``Kernels``).
    """
    return kernels.dot(x, table, idx, dtype, block, None)


def _expert_dot_fwd(x, table, idx, dtype, block, kernels):
    groups = kernels.groups(idx, table.shape[0])
    return kernels.dot(x, table, idx, dtype, block, groups), (x, table, idx, groups)


def _expert_dot_bwd(dtype, block, kernels, res, ct):
    x, table, idx, groups = res
    dx = kernels.bag(table, idx, ct, dtype, block, groups).astype(x.dtype)
    dtable = kernels.scatter(idx, ct, x, table.shape[0], table.dtype, block, groups)
    return dx, dtable, None


expert_dot.defvjp(_expert_dot_fwd, _expert_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def embedding_bag(table: jax.Array, idx: jax.Array, w: jax.Array, dtype, block: int, kernels: Kernels):
    """float32 ``[M, d]`` weighted sum of gathered rows, ``Σ_s w[m, s] · table[idx[m, s]]``.

    The generic "embedding bag" (PKM's value read-out, PEER's down projection) with a backward
    pass that recomputes gathers and scatter-adds into the table gradient (arguments as in
    ``expert_dot``).
    """
    return kernels.bag(table, idx, w, dtype, block, None)


def _embedding_bag_fwd(table, idx, w, dtype, block, kernels):
    groups = kernels.groups(idx, table.shape[0])
    return kernels.bag(table, idx, w, dtype, block, groups), (table, idx, w, groups)


def _embedding_bag_bwd(dtype, block, kernels, res, ct):
    table, idx, w, groups = res
    dtable = kernels.scatter(idx, w, ct, table.shape[0], table.dtype, block, groups)
    dw = kernels.dot(ct, table, idx, dtype, block, groups).astype(w.dtype)
    return dtable, None, dw


embedding_bag.defvjp(_embedding_bag_fwd, _embedding_bag_bwd)


def expert_dot_naive(x: jax.Array, table: jax.Array, idx: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Reference for ``expert_dot``: materialises ``table[idx]`` (kept by autodiff)."""
    rows = gather_rows(table, idx, dtype)
    return jnp.einsum("md,msd->ms", x.astype(dtype), rows, preferred_element_type=jnp.float32)


def embedding_bag_naive(table: jax.Array, idx: jax.Array, w: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Reference for ``embedding_bag``: materialises ``table[idx]`` (kept by autodiff)."""
    rows = gather_rows(table, idx, dtype)
    return jnp.einsum("ms,msd->md", w.astype(dtype), rows, preferred_element_type=jnp.float32)
