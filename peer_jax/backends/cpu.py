"""CPU backend: XLA:CPU-specific forms of the product-key layers' operations, and the native
C++ kernels (``peer_jax.native``) behind ``compute="native"``.

Everything here computes what ``backends/portable.py`` or the plain-jnp loops of
``layers/expert_compute.py`` and ``layers/product_keys.py`` compute (tests compare them); only
the form differs, chosen for how XLA:CPU lowers it. ``backends.ops`` says which form each
compute mode runs. Measured effects are in docs/peer_speed.md
("Where the CPU backend's choices come from").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from peer_jax import native as native_kernels
from peer_jax.layers import expert_compute as ec
from peer_jax.layers import product_keys as pk
from peer_jax.sharding import vary_like

# ----------------------------------------------------------------------------- query projection


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: jax.Array, kernel: jax.Array, transposed_grad: bool) -> jax.Array:
    return jnp.einsum("...d,dk->...k", x, kernel, preferred_element_type=jnp.float32)


def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` (contracting x's last axis, float32 result) with a custom VJP that fixes
    only the *form* of the kernel gradient; values equal ``portable.project``'s.

    Plain autodiff emits ``dot(g, x)`` followed by a transpose, which XLA:CPU lowers by
    materialising ``gᵀ`` fused into the query-BatchNorm backward: a strided
    ``[tokens, h·d_key]`` transpose that costs more than the projection's matmuls. The custom
    VJP writes ``dW = Σ_t x[t]ᵀ g[t]`` as one ``einsum('td,tk->dk')`` instead.
    """
    return _project(x, kernel, False)


def project_transposed_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``project`` with the kernel gradient computed as ``xᵀ @ g``, ``xᵀ`` materialised behind an
    optimization barrier (what ``compute="native"`` uses). XLA:CPU hands a dot that contracts
    the leading axes to Eigen, which is slower than the XNNPACK-fused dot on the transposed
    copy. The sums then run in another order, so the other compute modes keep ``project``'s
    einsum and their committed results stay bit-for-bit reproducible.
    ``lax.platform_dependent`` keeps the einsum wherever this is compiled for another platform.
    """
    return _project(x, kernel, True)


def _project_fwd(x, kernel, transposed_grad):
    return _project(x, kernel, transposed_grad), (x, kernel)


def _project_bwd(transposed_grad, res, g):
    x, kernel = res
    dx = jnp.einsum("...k,dk->...d", g, kernel)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    einsum = lambda x2, g2: jnp.einsum("td,tk->dk", x2, g2)  # noqa: E731
    if transposed_grad:
        dk = jax.lax.platform_dependent(x2, g2, cpu=lambda x2, g2: jax.lax.optimization_barrier(x2.T) @ g2,
                                        default=einsum)
    else:
        dk = einsum(x2, g2)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_project.defvjp(_project_fwd, _project_bwd)


# ----------------------------------------------------------------------------- scatter accumulators


def scatter_zeros(shape, dtype, tag: jax.Array) -> jax.Array:
    """Zeros that the compiler cannot merge with another same-shaped zeros.

    Two table gradients (u and v) both start from ``zeros([N, d])``; XLA's CSE merges the two
    constants into one buffer, and each in-place scatter loop then needs its own copy: one
    extra ``[N, d]`` temporary. Deriving the zero from a distinct array (``isnan(tag[0]) * 0``
    is exactly 0 for every value, and XLA does not fold float multiplications by zero) keeps
    the two broadcasts apart, so each is written straight into its loop's buffer. (An
    ``optimization_barrier`` does not help: XLA:CPU strips it before CSE; ``abs(t) < 0`` is
    folded to false.)
    """
    zero = jnp.isnan(tag.reshape(-1)[0]).astype(dtype) * 0  # exactly 0 for any tag value
    return jnp.broadcast_to(zero, shape)


def xla_scatter_outer(idx, w, y, num_rows, out_dtype, block, groups=None):
    """``expert_compute.scatter_loop`` into ``scatter_zeros``."""
    del groups
    return ec.scatter_loop(idx, w, y, num_rows, out_dtype, block, zeros=scatter_zeros)


# The XLA loops under the custom VJPs of compute="efficient" on CPU.
XLA_KERNELS = ec.Kernels(dot=ec.dot_loop, bag=ec.bag_loop, scatter=xla_scatter_outer)


# ----------------------------------------------------------------------------- native kernels
# The three gather/scatter loops of layers/expert_compute.py as C++ kernels (CPU, float32; the
# compute dtype and slot block of the XLA loops do not apply). `groups` is group_by_row(idx, N),
# computed once per custom VJP and shared by its kernels (None: the kernel call computes it).


def check_native(owner: str, dtype, param_dtype) -> None:
    """Start-up validation of ``compute="native"`` (names the setting and the fix)."""
    if np.dtype(dtype) != np.float32 or np.dtype(param_dtype) != np.float32:
        raise ValueError(f"{owner} compute='native' supports float32 only (dtype={np.dtype(dtype)}, "
                         f"param_dtype={np.dtype(param_dtype)}); use compute='efficient' for bfloat16.")
    native_kernels.ensure_available()


def group_by_row(idx: jax.Array, num_rows: int):
    return native_kernels.group_by_row(idx, num_rows)


def gather_dot(x, table, idx, dtype, block, groups=None):
    del dtype, block
    return vary_like(native_kernels.gather_dot(x, table, idx, groups), x, table, idx)


def embedding_bag(table, idx, w, dtype, block, groups=None):
    del dtype, block
    return vary_like(native_kernels.embedding_bag(table, idx, w, groups), table, idx, w)


def scatter_outer(idx, w, y, num_rows, out_dtype, block, groups=None):
    del block
    return vary_like(native_kernels.scatter_outer(idx, w, y, num_rows, groups), idx, w, y).astype(out_dtype)


NATIVE_KERNELS = ec.Kernels(dot=gather_dot, bag=embedding_bag, scatter=scatter_outer, group_by_row=group_by_row)


# ----------------------------------------------------------------------------- decode kernels
# The decode path's table reads (layers/expert_decode.py) as the token-centric C++ kernels: each
# (token, slot) pair reads its row straight from the float32 or bfloat16 table, no grouping by
# row, no [M·S, d] gathered copy. Sums are float32 on the stored values (the compute dtype does
# not apply). The decode path is for inference; its gradient is the plain-gather reference's
# (expert_compute.*_naive in float32), so a grad through it is exact, just not fast.


def _with_reference_grad(kernel, reference):
    """``kernel(*args)`` in the forward pass, the VJP of ``reference(*args)`` in the backward;
    integer arguments (the indices) get no cotangent."""

    @jax.custom_vjp
    def f(*args):
        return kernel(*args)

    def fwd(*args):
        return kernel(*args), args

    def bwd(args, g):
        diff = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]

        def ref(*values):
            full = list(args)
            for i, v in zip(diff, values):
                full[i] = v
            return reference(*full)

        cts = dict(zip(diff, jax.vjp(ref, *(args[i] for i in diff))[1](g)))
        return tuple(cts.get(i) for i in range(len(args)))

    f.defvjp(fwd, bwd)
    return f


# float32 [M, S]: <x[m], table[idx[m, s]]>.
decode_gather_dot = _with_reference_grad(
    lambda x, table, idx: vary_like(native_kernels.decode_gather_dot(x, table, idx), x, table, idx),
    lambda x, table, idx: ec.expert_dot_naive(x, table, idx, jnp.float32))

# float32 [M, d]: sum_s w[m, s] · table[idx[m, s]].
decode_bag = _with_reference_grad(
    lambda table, idx, w: vary_like(native_kernels.decode_bag(table, idx, w), table, idx, w),
    lambda table, idx, w: ec.embedding_bag_naive(table, idx, w, jnp.float32))


# ----------------------------------------------------------------------------- product-key selection


def select_topk(queries: jax.Array, sub_keys: jax.Array, top_k: int, *, approx: bool = False,
                recall_target: float = 0.95, chunk_tokens: int | None = None):
    """``product_keys.product_key_topk`` with the selection as one C++ kernel (``native_topk``).
    Always exact: ``approx`` and ``recall_target`` do not apply."""
    del approx, recall_target
    pk.check_shapes(queries, sub_keys, top_k)
    return pk.by_chunks(lambda q: native_topk(q, sub_keys, top_k), queries, chunk_tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def native_topk(queries: jax.Array, sub_keys: jax.Array, top_k: int):
    """The product-key top-k with the selection as one C++ kernel (the two half top-k's, the
    candidates and the final top-k in one multithreaded pass; the results of
    ``product_keys.product_key_topk``, ties included) and a sparse backward pass: the scores'
    cotangent reaches the queries and sub-keys only through the 2·top_k selected sub-key rows
    per query (an embedding bag and a scatter), not through dense ``[tokens, heads, n]`` score
    gradients. Float32 queries."""
    return _select_fwd(queries, sub_keys, top_k)[0]


def _select_fwd(queries, sub_keys, top_k):
    q1, q2, k1, k2, per_head = pk.split_halves(queries, sub_keys)
    n = k1.shape[-2]
    s1 = pk.half_scores(q1, k1.astype(queries.dtype), per_head)
    s2 = pk.half_scores(q2, k2.astype(queries.dtype), per_head)
    lead = s1.shape[:-1]
    scores, items = native_kernels.product_key_select(s1.reshape(-1, n), s2.reshape(-1, n), top_k)
    out = scores.reshape(*lead, top_k), items.reshape(*lead, top_k)
    return out, (queries, sub_keys, out[1])


def _select_bwd(top_k, res, ct):
    """score[.., j] = q₁·C[a_j] + q₂·C'[b_j]: only the selected sub-key rows get gradients."""
    queries, sub_keys, items = res
    ds = ct[0].astype(jnp.float32)
    q1, q2, k1, k2, per_head = pk.split_halves(queries, sub_keys)
    n, half, heads = k1.shape[-2], k1.shape[-1], queries.shape[-2]
    rows = ds.size // top_k
    a, b = items // n, items % n
    if per_head:  # per-head tables stacked into one [heads·n, half] table; rows offset by head
        offset = (jnp.arange(heads, dtype=jnp.int32) * n)[:, None]
        a, b = a + offset, b + offset
    tables = [t.reshape(-1, half).astype(jnp.float32) for t in (k1, k2)]
    flat = lambda x: x.reshape(rows, -1)  # noqa: E731
    dq, dk = [], []
    for t, i, q in ((tables[0], a, q1), (tables[1], b, q2)):
        # Small tables go token-centric (no row grouping); large per-head ones share one grouping.
        groups = None if native_kernels.small_table(*t.shape) else native_kernels.group_by_row(flat(i), t.shape[0])
        dq.append(native_kernels.embedding_bag(t, flat(i), flat(ds), groups))
        dk.append(native_kernels.scatter_outer(flat(i), flat(ds), flat(q).astype(jnp.float32), t.shape[0], groups))
    dq = jnp.concatenate([x.reshape(q1.shape) for x in dq], axis=-1).astype(queries.dtype)
    if per_head:
        dkeys = jnp.stack([x.reshape(heads, n, half) for x in dk], axis=1)
    else:
        dkeys = jnp.stack(dk, axis=0)
    return dq, dkeys.astype(sub_keys.dtype)


native_topk.defvjp(_select_fwd, _select_bwd)
