"""The routing building blocks of `MoE` (peer_jax/layers/moe.py): capacity, routing groups,
the two buffered routings (dispatch/combine tensors), the router losses (shared with dropless
routing), and the buffered expert computation that the reference path and the expert-parallel
shard_map both run. Semantics (groups, capacity, causality): moe.py's module docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from peer_jax.layers import activations


def expert_capacity(group_tokens: int, num_experts: int, capacity_factor: float, top_k: int = 1) -> int:
    """Slots per expert per routing group: round_half_up(cf * k * S / E), in [1, S].

    Rounding half up (not Python's banker's rounding) keeps C monotone in S; the floor of 1
    means that for S < E / (cf * k) the effective capacity factor is E / (k * S) > cf, which
    FLOP accounting must use (expected experts per token = E * C / S).
    """
    c = math.floor(capacity_factor * top_k * group_tokens / num_experts + 0.5)
    return int(min(max(c, 1), group_tokens))


# ----------------------------------------------------------------------------- grouping
def to_groups(a: jax.Array, grouping: str, group_size: int) -> jax.Array:
    """[B, T, ...] -> [G, S, ...] routing groups (see the module docstring)."""
    b, t, rest = a.shape[0], a.shape[1], a.shape[2:]
    if grouping == "sequence":
        return a.reshape(b * (t // group_size), group_size, *rest)
    a = a.reshape(b // group_size, group_size, t, *rest)
    a = jnp.moveaxis(a, 2, 0)  # [T, B/S, S, ...]
    return a.reshape(t * (b // group_size), group_size, *rest)


def from_groups(a: jax.Array, grouping: str, batch: int, length: int) -> jax.Array:
    """Inverse of `to_groups`."""
    rest = a.shape[2:]
    if grouping == "sequence":
        return a.reshape(batch, length, *rest)
    s = a.shape[1]
    a = a.reshape(length, batch // s, s, *rest)
    return jnp.moveaxis(a, 0, 2).reshape(batch, length, *rest)


# ------------------------------------------------------------------------------ routing
def expert_choice_routing(probs: jax.Array, valid: jax.Array, capacity: int):
    """Each expert takes the `capacity` valid tokens of a group with the highest router prob.

    probs [G, S, E] (softmax over experts), valid [G, S] -> dispatch, combine [G, S, E, C]:
    dispatch is the 0/1 slot assignment, combine = dispatch * gate (the router prob).
    Invalid tokens score -1 < any prob, so they are taken only when fewer than C valid tokens
    exist, and those slots are then emptied: padding never takes capacity.
    """
    s = probs.shape[1]
    scores = jnp.where(valid[..., None], probs, -1.0)
    gates, idx = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G, E, C]
    taken = gates >= 0.0
    dispatch = jax.nn.one_hot(idx, s, dtype=probs.dtype) * taken[..., None]  # [G, E, C, S]
    dispatch = jax.lax.stop_gradient(jnp.moveaxis(dispatch, 3, 1))  # [G, S, E, C]
    combine = dispatch * jnp.where(taken, gates, 0.0)[:, None]
    return dispatch, combine


def token_choice_routing(probs: jax.Array, valid: jax.Array, top_k: int, capacity: int, renormalize: bool):
    """Each token picks its top-k experts; an expert keeps the first `capacity` arrivals.

    Arrival order is token-major (position, then k-th choice), so a token's slot never depends
    on later tokens. Gates are the top-k probs, renormalised to sum to 1 when `renormalize`.
    Returns dispatch, combine [G, S, E, C] as in `expert_choice_routing`.
    """
    g, s, e = probs.shape
    gates, experts = jax.lax.top_k(probs, top_k)  # [G, S, K]
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    choice = jax.nn.one_hot(experts, e, dtype=probs.dtype) * valid[..., None, None]  # [G,S,K,E]
    flat = choice.reshape(g, s * top_k, e)
    position = (jnp.cumsum(flat, axis=1) - 1.0) * flat  # slot index where chosen, else 0
    position = position.reshape(g, s, top_k, e).sum(axis=2).astype(jnp.int32)  # k choices distinct
    chosen = choice.sum(axis=2)  # [G, S, E] in {0, 1}
    kept = chosen * (position < capacity)
    dispatch = jax.lax.stop_gradient(jax.nn.one_hot(position, capacity, dtype=probs.dtype) * kept[..., None])
    gate = jnp.sum(choice * gates[..., None], axis=2)  # [G, S, E]
    return dispatch, dispatch * gate[..., None]


def load_balancing_loss(probs: jax.Array, valid: jax.Array, top_k: int) -> jax.Array:
    """Switch/GShard loss E * sum_e f_e * P_e over valid tokens (1 when routing is uniform).

    f_e = share of the k * N top-k assignments (before capacity) that go to e, P_e = mean
    router prob of e. Its minimum, 1, is reached when either is uniform.
    """
    e = probs.shape[-1]
    v = valid.astype(jnp.float32)[..., None]
    n = jnp.maximum(jnp.sum(v), 1.0)
    _, experts = jax.lax.top_k(probs, top_k)
    assigned = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=-2) * v
    f = jnp.sum(assigned, axis=tuple(range(assigned.ndim - 1))) / (n * top_k)
    p = jnp.sum(probs * v, axis=tuple(range(probs.ndim - 1))) / n
    return e * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """ST-MoE z-loss: mean over valid tokens of logsumexp(logits)^2 (keeps logits small)."""
    z = jax.nn.logsumexp(logits, axis=-1) ** 2
    v = valid.astype(jnp.float32)
    return jnp.sum(z * v) / jnp.maximum(jnp.sum(v), 1.0)


# ------------------------------------------------------------------------------ experts
def expert_hidden(activation: str, project: Callable[[str], jax.Array]) -> jax.Array:
    """The experts' hidden activation from `project(name)`, the pre-activation of the weight
    `name` ('w_in', and 'w_gate' for gated units), through the activation registry."""
    names = ("w_gate", "w_in") if activations.is_gated(activation) else ("w_in",)
    # A tuple indexes like the registry's stacked [n_in, ...] array without copying into one.
    return activations.mlp(activation, tuple(project(n) for n in names))


def expert_mlp(xe: jax.Array, w: dict[str, jax.Array], activation: str) -> jax.Array:
    """Runs each expert's MLP on its buffer: xe [E, G, C, d] -> [E, G, C, d] (no biases)."""
    h = expert_hidden(activation, lambda name: jnp.einsum("egcd,edm->egcm", xe, w[name]))
    return jnp.einsum("egcm,emd->egcd", h, w["w_out"])


def moe_groups(xg, probs, valid, route: Callable, experts: Callable):
    """Route, dispatch, run experts, combine, for grouped tokens xg [G, S, d].

    Returns y [G, S, d] (float32), per-expert load [E], and the counts of valid tokens that
    got no expert and of valid tokens (float32 scalars), all summed over this call's groups.
    """
    dispatch, combine = route(probs, valid)
    xe = jnp.einsum("gsec,gsd->egcd", dispatch.astype(xg.dtype), xg)
    ye = experts(xe)
    y = jnp.einsum("gsec,egcd->gsd", combine.astype(ye.dtype), ye, preferred_element_type=jnp.float32)
    load = jnp.sum(dispatch, axis=(0, 1, 3))
    routed = jnp.sum(dispatch, axis=(2, 3)) > 0
    dropped = jnp.sum(valid & ~routed).astype(jnp.float32)
    return y, load, dropped, jnp.sum(valid).astype(jnp.float32)
