"""Dropless token-choice top-k MoE: sort (token, choice) pairs by expert, grouped matmuls, unsort.

`MoE(routing="dropless")` uses this module (MaxText's default MoE design). Every valid token
goes to its top-k experts with no capacity, so nothing is dropped and routing is per token:
no routing groups, no dependence on the batch or on future tokens (causal by construction).

Computation, for N tokens and k choices each:

1. Router (in `MoE`, float32): probs = softmax(x W_r); top-k experts and gates per token,
   gates renormalised to sum to 1 when k > 1 (`renormalize_top_k`). Padding (mask False)
   is never routed: its pairs get the sentinel key E, sort last, lie outside every group,
   and output exactly zero.
2. `dropless_local`: the N·k pairs are argsorted by expert (stable, so ties keep token
   order), the token rows gathered in that order, and each expert's MLP runs on its
   contiguous rows with `jax.lax.ragged_dot` (group sizes = tokens per expert). The
   inverse permutation puts the rows back; they are summed per token, weighted by the gates.
3. Losses are `MoE`'s: load balancing (Switch, over the pre-capacity top-k assignment, which
   here is the processed assignment) plus router z-loss.

`dropless_reference` is the plain one-hot formulation: every expert on every token, then a
[N, E] combine matrix that is zero outside each token's top-k. Tests compare values and
gradients of both.

Backends. On TPU, `ragged_dot` lowers to XLA's native grouped matmul. On CPU (jax 0.10)
it lowers to a dense masked dot over all groups (`_ragged_dot_general_impl`): every row is
multiplied by every expert's weights, i.e. E·k expert MLPs per token, the same arithmetic as
the one-hot reference times k. It is exact, only not fast; `ragged_dot_is_dense()` tells
`peer_jax/flops.py` to report that extra work as overhead (it is not model FLOPs).
`MoE(grouped_matmul="padded_blocks")` is the CPU alternative (`padded_block_expert_mlp`): each
expert's rows padded to whole blocks, one batched matmul over blocks, so the arithmetic is
that of the routed tokens only (speed against ragged_dot and dense: benchmarks/moe_dropless_cpu.py).

Expert parallelism (`dropless_expert_parallel`, a `jax.shard_map`)
------------------------------------------------------------------
Mesh axes come from the logical rules (`current_rules()`, else `RULES_DEFAULT`): experts
over the axes of 'experts', each expert's hidden dim over those of 'moe_mlp', tokens over
those of ('batch', 'length'). Each device

* all-gathers the tokens (rows, top-k experts, gates, mask) over the expert axes that also
  split tokens, so it sees every token of its expert group;
* runs `dropless_local` for its E/n_e local experts only (non-local pairs take the sentinel
  key, as padding does) on its 1/n_m slice of the hidden dim;
* reduce-scatters the per-token partial outputs over the gathered expert axes (psum over
  expert axes that do not split tokens) and psums over the hidden-dim axes.

Why all-gather + reduce-scatter rather than a ragged all-to-all: every shape is static
and exact with no worst-case receive buffer to size or overflow to handle (a dropless
all-to-all must either size buffers for every token landing on one shard or negotiate
sizes with an extra collective), the collectives are the ones every backend supports (CPU
included), and the two collectives are each other's transpose, so the backward is the same
pattern. The cost: each token row travels to all n_e shards instead of to its k experts'
shards, and each shard sorts and buffers n_e·N_local·k rows (the static worst case). That
is fine while n_e is small or comparable to k; for large expert-parallel degrees a ragged
all-to-all (MaxText's choice) moves less data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from peer_jax import sharding as shd
from peer_jax.layers.moe_routing import expert_hidden


def ragged_dot_is_dense(backend: str | None = None) -> bool:
    """Whether `jax.lax.ragged_dot` runs as a dense masked dot over all groups on `backend`
    (CPU in jax 0.10: the platform-independent lowering; TPU has a native grouped matmul)."""
    return (backend or jax.default_backend()) == "cpu"


def top_k_routing(probs: jax.Array, valid: jax.Array, top_k: int, renormalize: bool):
    """probs [..., E], valid [...] -> experts [..., k] int32, gates [..., k] (0 for padding)."""
    gates, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return experts.astype(jnp.int32), jnp.where(valid[..., None], gates, 0.0)


GROUPED_MATMULS = ("ragged_dot", "padded_blocks")


def grouped_expert_mlp(xs: jax.Array, w: dict[str, jax.Array], group_sizes: jax.Array, activation: str):
    """Expert MLPs on rows sorted by expert: xs [R, d], w[...] [E_loc, ...] -> [R, d] float32.

    Rows past sum(group_sizes) belong to no group; `ragged_dot` leaves them zero."""
    h = expert_hidden(activation, lambda name: jax.lax.ragged_dot(xs, w[name], group_sizes))
    return jax.lax.ragged_dot(h, w["w_out"], group_sizes, preferred_element_type=jnp.float32)


def padded_slots(rows: int, num_groups: int, block: int) -> int:
    """Static slot count of `padded_block_expert_mlp`: every group padded up to a multiple of
    `block` needs at most ceil(rows / block) + num_groups blocks."""
    return (-(-rows // block) + num_groups) * block


def padded_block_expert_mlp(xs: jax.Array, w: dict[str, jax.Array], group_sizes: jax.Array, activation: str,
                            block: int):
    """`grouped_expert_mlp` as batched matmuls over blocks of `block` rows, each block one
    expert's (the block-sparse layout of MegaBlocks, here for backends where `ragged_dot` is
    dense): each group is padded up to a multiple of `block`, each block gathers its
    expert's weights, and one batched matmul runs all blocks. Work: `padded_slots` rows
    instead of R · E_loc, i.e. at most (R + E_loc·block) / R times the routed rows.

    xs [R, d] sorted by expert, group_sizes [E_loc] (rows past their sum: no group) -> [R, d]
    float32, rows past sum(group_sizes) zero."""
    rows, d = xs.shape
    e_loc = group_sizes.shape[0]
    slots = padded_slots(rows, e_loc, block)
    n_blocks = slots // block
    padded = -(-group_sizes // block) * block  # [E_loc] rows of each padded group
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    start = jnp.cumsum(group_sizes) - group_sizes  # each group's first row in xs
    # Slot s lies in block s // block, which belongs to the group whose padded range holds it
    # (E_loc for the unused blocks at the end); its row is that group's row s - padded_start.
    block_group = jnp.searchsorted(padded_end, jnp.arange(n_blocks) * block, side="right")
    slot_group = jnp.repeat(block_group, block, total_repeat_length=slots)
    safe = jnp.minimum(slot_group, e_loc - 1)
    within = jnp.arange(slots) - padded_start[safe]
    used = (slot_group < e_loc) & (within < group_sizes[safe])
    xp = jnp.where(used[:, None], xs[jnp.where(used, start[safe] + within, 0)], 0).reshape(n_blocks, block, d)
    wb = {k: v[jnp.minimum(block_group, e_loc - 1)] for k, v in w.items()}  # [n_blocks, ...]
    h = expert_hidden(activation, lambda name: jnp.einsum("bcd,bdm->bcm", xp, wb[name]))
    yp = jnp.einsum("bcm,bmd->bcd", h, wb["w_out"], preferred_element_type=jnp.float32).reshape(slots, d)
    # Row r of xs (group g, r - start[g] within it) came from slot padded_start[g] + r - start[g].
    row_group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right")
    row_safe = jnp.minimum(row_group, e_loc - 1)
    routed = row_group < e_loc
    slot = padded_start[row_safe] + jnp.arange(rows) - start[row_safe]
    return jnp.where(routed[:, None], yp[jnp.where(routed, slot, 0)], 0.0)


def dropless_local(x, experts, gates, valid, w, activation: str, first_expert=0, grouped_matmul="ragged_dot",
                   block=64):
    """The experts first_expert .. first_expert + E_loc - 1 (w[...] is [E_loc, ...]) on their
    pairs: x [N, d], experts/gates [N, k], valid [N] -> y [N, d] float32 (the gate-weighted
    sum over this shard's experts only) and load [E_loc] float32 (pairs per local expert).
    `grouped_matmul`: 'ragged_dot' (`grouped_expert_mlp`) or 'padded_blocks'
    (`padded_block_expert_mlp` with `block` rows per block)."""
    n, k = experts.shape
    e_loc = w["w_in"].shape[0]
    local = experts - first_expert
    routed = valid[:, None] & (local >= 0) & (local < e_loc)
    key = jnp.where(routed, local, e_loc).reshape(n * k)  # the sentinel E_loc sorts last
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.sum(jax.nn.one_hot(key, e_loc, dtype=jnp.int32), axis=0)  # sentinel: no row
    if grouped_matmul == "padded_blocks":
        ys = padded_block_expert_mlp(x[order // k], w, group_sizes, activation, block)  # [N·k, d], sorted
    else:
        ys = grouped_expert_mlp(x[order // k], w, group_sizes, activation)  # [N·k, d], sorted
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y_pairs = jnp.where(routed[..., None], ys[inverse].reshape(n, k, -1), 0.0)
    y = jnp.einsum("nkd,nk->nd", y_pairs, gates.astype(jnp.float32))
    return y, group_sizes.astype(jnp.float32)


def dropless_reference(x, router, w, valid, *, top_k: int, renormalize: bool, activation: str):
    """Plain one-hot formulation from the raw inputs: x [N, d], router [d, E], w as in
    `MoE`, valid [N] -> y [N, d] float32. Every expert runs on every token (N·E MLPs); the
    [N, E] combine matrix is each token's renormalised top-k probs, zero elsewhere."""
    probs = jax.nn.softmax(jnp.einsum("nd,de->ne", x.astype(jnp.float32), router.astype(jnp.float32)), axis=-1)
    experts, gates = top_k_routing(probs, valid, top_k, renormalize)
    combine = jnp.einsum("nke,nk->ne", jax.nn.one_hot(experts, probs.shape[-1], dtype=jnp.float32), gates)
    h = expert_hidden(activation, lambda name: jnp.einsum("nd,edm->nem", x, w[name]))
    ye = jnp.einsum("nem,emd->ned", h, w["w_out"], preferred_element_type=jnp.float32)
    return jnp.einsum("ned,ne->nd", ye, combine)


# ------------------------------------------------------------------ expert parallelism
def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def spec_entry(axes: tuple[str, ...]):
    """A PartitionSpec entry for `axes`: None, one name, or a tuple of names."""
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def expert_weight_axes(mesh, rules) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(expert axes, hidden axes) of the mesh that `rules` split the expert weights
    ('experts', 'embed', 'moe_mlp') over; a mesh axis serves experts first."""
    w_spec = shd.logical_to_spec(("experts", "embed", "moe_mlp"), rules)
    expert_axes = tuple(a for a in _axes(w_spec[0]) if a in mesh.axis_names)
    hidden_axes = tuple(a for a in _axes(w_spec[2]) if a in mesh.axis_names and a not in expert_axes)
    return expert_axes, hidden_axes


def ep_layout(num_experts: int, mlp_dim: int, batch: int, length: int):
    """(token spec [B, T], expert axes, hidden axes) for the shard_map path, or None when the
    mesh in context does not split experts (then the local path runs, auto-sharded)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = shd.current_rules() or shd.RULES_DEFAULT
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    expert_axes, hidden_axes = expert_weight_axes(mesh, rules)
    if size(expert_axes) <= 1:
        return None
    tok = shd.logical_to_spec(("batch", "length"), rules)
    batch_axes = tuple(a for a in _axes(tok[0]) if a in mesh.axis_names and a not in hidden_axes)
    length_axes = tuple(a for a in _axes(tok[1]) if a in mesh.axis_names and a not in hidden_axes + batch_axes)
    checks = [
        (num_experts % size(expert_axes) == 0,
         f"num_experts={num_experts} must be divisible by the expert mesh axes {expert_axes} ({size(expert_axes)})"),
        (mlp_dim % size(hidden_axes) == 0,
         f"mlp_dim={mlp_dim} must be divisible by the 'moe_mlp' mesh axes {hidden_axes} ({size(hidden_axes)})"),
        (batch % size(batch_axes) == 0,
         f"batch size {batch} must be divisible by the 'batch' mesh axes {batch_axes} ({size(batch_axes)})"),
        (length % size(length_axes) == 0,
         f"length {length} must be divisible by the 'length' mesh axes {length_axes} ({size(length_axes)})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"MoE (dropless, expert parallel): {message}; change the shapes or the mesh.")
    return P(spec_entry(batch_axes), spec_entry(length_axes)), expert_axes, hidden_axes


def dropless_expert_parallel(x, experts, gates, valid, w, activation: str, layout, grouped_matmul="ragged_dot",
                             block=64):
    """`dropless_local` over all experts, inside `jax.shard_map` (module docstring):
    x [B, T, d], experts/gates [B, T, k], valid [B, T] -> y [B, T, d] float32, load [E]."""
    token_spec, expert_axes, hidden_axes = layout
    num_experts = w["w_in"].shape[0]
    token_axes = _axes(token_spec[0]) + _axes(token_spec[1])
    gathered = tuple(a for a in expert_axes if a in token_axes)  # experts that split tokens
    summed = tuple(a for a in expert_axes if a not in token_axes)  # experts that see all tokens
    all_axes = token_axes + summed + hidden_axes

    def body(x, experts, gates, valid, w):
        lb, lt, d = x.shape
        flat = [a.reshape(lb * lt, *a.shape[2:]) for a in (x, experts, gates, valid)]
        if gathered:
            flat = [jax.lax.all_gather(a, gathered, axis=0, tiled=True) for a in flat]
        xf, ef, gf, vf = flat
        e_loc = w["w_in"].shape[0]
        first = jax.lax.axis_index(expert_axes) * e_loc
        # Tokens are replicated over the hidden axes and weights over the token axes: mark
        # both varying over everything, so the transposes sum grads over what they miss.
        w = {k: shd.vary(v, all_axes) for k, v in w.items()}
        y, load = dropless_local(shd.vary(xf, all_axes), ef, shd.vary(gf, all_axes), vf, w, activation, first,
                                 grouped_matmul, block)
        if gathered:
            y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
        if summed or hidden_axes:
            y = jax.lax.psum(y, summed + hidden_axes)
        # Place the local counts in the full [E] vector and sum over experts and token shards.
        load = jax.lax.dynamic_update_slice(jnp.zeros((num_experts,), load.dtype), load, (first,))
        load = jax.lax.psum(load, tuple(dict.fromkeys(expert_axes + token_axes)))
        return y.reshape(lb, lt, d), load

    ex, hid = spec_entry(expert_axes), spec_entry(hidden_axes)
    w_spec = {"w_in": P(ex, None, hid), "w_gate": P(ex, None, hid), "w_out": P(ex, hid, None)}
    tok = token_spec
    return jax.shard_map(
        body, in_specs=(tok, tok, tok, tok, {k: w_spec[k] for k in w}), out_specs=(tok, P())
    )(x, experts, gates, valid, w)
