"""Coarse-grained Mixture-of-Experts FFW: the MoE baseline of He (2024).

The paper's baseline is 128 experts, each the size of the dense MLP, with **expert-choice**
routing (Zhou et al. 2022). Two token-choice top-k variants are kept for comparison, chosen by
``routing``:

* ``"token_choice"``: Switch/GShard, buffered: each expert has C slots per routing group and
  drops the tokens that overflow them (the einsum formulation below).
* ``"dropless"``: MaxText's default: no capacity, no groups, nothing dropped; pairs sorted by
  expert and grouped matmuls (`jax.lax.ragged_dot`). ``capacity_factor``, ``grouping`` and
  ``group_size`` do not apply (the latter two must stay None). Implementation, its
  expert-parallel shard_map and the choice of collectives: `peer_jax/layers/moe_dropless.py`.
  The rest of this docstring describes the two buffered routings.

Routing groups and causality
----------------------------
Expert choice lets every expert pick its top-C tokens *within a routing group*, so a token's
fate depends on the other tokens of its group. Which tokens share a group is a modelling
choice (the paper is silent), set by ``grouping``:

* ``"position"`` (default): a group is the tokens at **one position across** ``group_size``
  **sequences** of the batch (default: the whole batch). A token only competes with tokens at
  the same position of other, independent sequences, whose hidden states depend on their
  positions <= t only, so the output at position t never sees a future token: training and a
  teacher-forced eval are causal. Costs: routing depends on the batch (evaluate with the same
  batch size; with one sequence C = 1 of 1 and every expert takes the token); the capacity
  C = cf * B / E is small (1 for B = E = 128), and when B < E / cf it rounds up to 1 so the
  expected experts per token rise above cf (see `expert_capacity`); and under data
  parallelism a group spans devices, so the expert-parallel path first reshards tokens from
  batch- to length-sharded with one all_to_all (the same volume as the dispatch) and back.
* ``"sequence"``: Zhou et al.'s original: a group is ``group_size`` consecutive positions of
  one sequence (default: all of it). Tokens at t and t' > t compete for the same C slots, so
  whether t is processed depends on future tokens (causal leakage): training perplexity is
  optimistic and autoregressive decoding cannot reproduce it. Kept for comparison only.

Token choice defaults to ``"sequence"`` groups and resolves capacity overflow in token-major
order (position first, then the token's k-th choice), so a token's slot depends only on
earlier tokens of its group: it is causal too.

Capacity, per group of S tokens: C = max(1, round_half_up(capacity_factor * top_k * S / E)),
capped at S (top_k = 1 for expert choice). Expert choice processes exactly C tokens per expert
when the group has >= C valid tokens. Padding (mask False) is never routed and outputs zero.

Expert parallelism
------------------
Mesh axes come from the logical rules in context (`current_rules()`, else `RULES_DEFAULT`):
experts over the axes of 'experts', each expert's hidden dim over those of 'moe_mlp' (less the
expert axes), tokens over those of 'batch' plus every expert axis (less the hidden axes).
Under the default rules: experts over 'expert', hidden dim over 'model', tokens over
('data', 'expert'). Without a mesh whose expert axes split experts (or with
``expert_parallel=False``) the plain einsum reference runs: dispatch/combine tensors of shape
[G, S, E, C] (one-hot, MXU-friendly, the GShard/MaxText "dense" formulation). Otherwise the
same routing and einsums run inside `jax.shard_map`: expert buffers [E, G, C, d] go through
`all_to_all` over the expert axes (split E, gather groups), each device runs its E/n_e experts
on its 1/n_m slice of the hidden dim, a `psum` over the hidden axes sums the hidden-dim
partials, and a second `all_to_all` returns the results. Tokens or parameters laid out
otherwise (rules whose 'batch' leaves out an expert axis, FSDP's 'embed' -> 'data') are
resharded by the shard_map boundary. The router (d x E, tiny) runs outside the shard_map on
the auto-sharded batch, so its losses are global over the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from peer_jax import sharding as shd
from peer_jax.layers import activations, intermediates
from peer_jax.layers import moe_dropless as dropless
from peer_jax.layers.cost import FFWCount
from peer_jax.layers.dense import default_mlp_dim
from peer_jax.layers.moe_routing import (  # noqa: F401  (re-exported: the MoE's building blocks)
    expert_capacity,
    expert_choice_routing,
    expert_mlp,
    from_groups,
    load_balancing_loss,
    moe_groups,
    router_z_loss,
    to_groups,
    token_choice_routing,
)

ROUTINGS = ("expert_choice", "token_choice", "dropless")
GROUPINGS = ("position", "sequence")

Initializer = Callable[..., jax.Array]
# Each expert is a dense layer batched over experts: fan-in is the d (or m) axis, not E.
DEFAULT_KERNEL_INIT = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)
# Switch Transformer: a small router init keeps early routing near uniform and stable.
DEFAULT_ROUTER_INIT = jax.nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")


class MoE(nnx.Module):
    """Mixture of `num_experts` dense MLPs (d_model -> mlp_dim -> d_model) behind a router.

    Sows (nnx.Intermediate): 'aux_loss' (weighted: load balancing, token choice and dropless
    only, plus router z-loss), 'expert_load' (float32 [E], tokens processed per expert in the call),
    'dropped_fraction' (share of valid tokens processed by no expert). `train` does not
    change the computation: routing and capacity are the same in training and evaluation.
    """

    def __init__(
        self,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        num_experts: int = 128,
        mlp_dim: int | None = None,
        activation: str = "gelu",
        routing: str = "expert_choice",
        top_k: int = 2,
        capacity_factor: float = 1.0,
        grouping: str | None = None,
        group_size: int | None = None,
        renormalize_top_k: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        expert_parallel: bool = True,
        grouped_matmul: str = "ragged_dot",
        block_size: int = 64,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        router_init: Initializer = DEFAULT_ROUTER_INIT,
    ):
        """Settings that need a word (the rest are in the module docstring):

        mlp_dim: per expert; None = `dense.default_mlp_dim` (DenseFFW's default), so each
            expert is exactly the dense FFW it replaces.
        top_k, renormalize_top_k, aux_loss_weight: token choice and dropless only (expert choice
            is balanced by construction and needs no load-balancing loss).
        capacity_factor, grouping, group_size: the buffered routings only (not dropless).
        grouping: None = 'position' for expert choice (causal), 'sequence' for token choice.
        group_size: sequences per group ('position') or positions per group ('sequence');
            None = the whole batch / sequence. Must divide it.
        z_loss_weight: router z-loss for both routings; it only keeps router logits small.
        expert_parallel: use the shard_map path when a mesh with 'expert' > 1 is in context.
        grouped_matmul, block_size: dropless only. 'ragged_dot' (TPU's native grouped matmul;
            on CPU a dense masked dot over all experts) or 'padded_blocks' (each expert's rows
            padded to a multiple of `block_size`, one batched matmul over the blocks: at most
            (tokens·top_k + num_experts·block_size) rows of work; the fast choice on CPU).
        """
        if mlp_dim is None:  # each expert is the dense FFW it replaces
            mlp_dim = default_mlp_dim(d_model, activation)
        dropless_ = routing == "dropless"
        _check(
            not dropless_ or (grouping is None and group_size is None),
            f"MoE: routing='dropless' routes each token on its own; grouping={grouping!r} and "
            f"group_size={group_size!r} must be None.",
        )
        if not dropless_:
            grouping = grouping or ("position" if routing == "expert_choice" else "sequence")
        _check(d_model >= 1, f"MoE: d_model={d_model} must be >= 1.")
        _check(num_experts >= 1, f"MoE: num_experts={num_experts} must be >= 1 (the paper uses 128).")
        _check(mlp_dim >= 1, f"MoE: mlp_dim={mlp_dim} must be >= 1 (default 4 * d_model).")
        _check(activation in activations.names(),
               f"MoE: activation={activation!r} is unknown; use one of {activations.names()}.")
        _check(routing in ROUTINGS, f"MoE: routing={routing!r} is unknown; use one of {ROUTINGS}.")
        _check(dropless_ or grouping in GROUPINGS, f"MoE: grouping={grouping!r} is unknown; use one of {GROUPINGS}.")
        _check(
            routing == "expert_choice" or 1 <= top_k <= num_experts,
            f"MoE: top_k={top_k} must be in [1, num_experts={num_experts}] for {routing}.",
        )
        _check(grouped_matmul in dropless.GROUPED_MATMULS,
               f"MoE: grouped_matmul={grouped_matmul!r} is unknown; use one of {dropless.GROUPED_MATMULS}.")
        _check(block_size >= 1, f"MoE: block_size={block_size} must be >= 1 (e.g. 64).")
        _check(capacity_factor > 0, f"MoE: capacity_factor={capacity_factor} must be > 0 (e.g. 1.0 or 1.25).")
        _check(
            group_size is None or group_size >= 1,
            f"MoE: group_size={group_size} must be >= 1, or None for the whole batch/sequence.",
        )
        _check(
            aux_loss_weight >= 0 and z_loss_weight >= 0,
            f"MoE: aux_loss_weight={aux_loss_weight} and z_loss_weight={z_loss_weight} must be >= 0.",
        )
        self.d_model, self.num_experts, self.mlp_dim = d_model, num_experts, mlp_dim
        self.activation, self.routing, self.grouping, self.group_size = activation, routing, grouping, group_size
        self.top_k = top_k if routing != "expert_choice" else 1
        self.capacity_factor, self.renormalize_top_k = capacity_factor, renormalize_top_k
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.expert_parallel, self.dtype = expert_parallel, dtype
        self.grouped_matmul, self.block_size = grouped_matmul, block_size

        e, d, m = num_experts, d_model, mlp_dim
        # The router is d x E: too small to shard, and the shard_map path wants it whole.
        self.router = nnx.Param(router_init(rngs.params(), (d, e), param_dtype), out_sharding=("embed", None))
        in_names, out_names = ("experts", "embed", "moe_mlp"), ("experts", "moe_mlp", "embed")
        self.w_in = nnx.Param(kernel_init(rngs.params(), (e, d, m), param_dtype), out_sharding=in_names)
        self.w_gate = (
            nnx.Param(kernel_init(rngs.params(), (e, d, m), param_dtype), out_sharding=in_names)
            if activations.is_gated(activation)
            else None
        )
        self.w_out = nnx.Param(kernel_init(rngs.params(), (e, m, d), param_dtype), out_sharding=out_names)

    def capacity(self, group_tokens: int) -> int:
        """Slots per expert in a routing group of `group_tokens` tokens."""
        return expert_capacity(group_tokens, self.num_experts, self.capacity_factor, self.top_k)

    def resolved_group_size(self, batch: int, length: int) -> int:
        """Tokens per routing group for an input of [batch, length]; checks divisibility."""
        full = batch if self.grouping == "position" else length
        what = "batch size" if self.grouping == "position" else "sequence length"
        gs = full if self.group_size is None else self.group_size
        if full % gs:
            raise ValueError(
                f"MoE: group_size={gs} must divide the {what} {full} (grouping={self.grouping!r}); "
                "change `group_size` or set it to None."
            )
        return gs

    def _route_fn(self, capacity: int) -> Callable:
        if self.routing == "expert_choice":
            return lambda p, v: expert_choice_routing(p, v, capacity)
        renorm = self.renormalize_top_k and self.top_k > 1
        return lambda p, v: token_choice_routing(p, v, self.top_k, capacity, renorm)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        del train  # routing is identical in training and evaluation
        b, t, d = x.shape
        if d != self.d_model:
            raise ValueError(f"MoE: input feature size {d} != d_model={self.d_model}.")
        if self.routing == "dropless":  # shape checks first, before any compute
            gs, layout = None, (dropless.ep_layout(self.num_experts, self.mlp_dim, b, t)
                                if self.expert_parallel else None)
        else:
            gs, layout = self.resolved_group_size(b, t), self._ep_layout(b, t)
        valid = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        # The router runs in float32: top-k decisions on bf16 logits flip on rounding noise.
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)

        aux = self.z_loss_weight * router_z_loss(logits, valid)
        if self.routing != "expert_choice":
            aux = aux + self.aux_loss_weight * load_balancing_loss(probs, valid, self.top_k)

        weights = {"w_in": self.w_in[...], "w_out": self.w_out[...]}
        if self.w_gate is not None:
            weights["w_gate"] = self.w_gate[...]
        weights = {k: v.astype(self.dtype) for k, v in weights.items()}
        xc = x.astype(self.dtype)

        if self.routing == "dropless":
            y, load, dropped, n_valid = self._dropless(xc, probs, valid, weights, layout)
        elif layout is not None:
            route = self._route_fn(self.capacity(gs))
            y, load, dropped, n_valid = self._expert_parallel(xc, probs, valid, weights, gs, route, *layout)
        else:
            route = self._route_fn(self.capacity(gs))
            y, load, dropped, n_valid = moe_groups(
                to_groups(xc, self.grouping, gs),
                to_groups(probs, self.grouping, gs),
                to_groups(valid, self.grouping, gs),
                route,
                lambda xe: expert_mlp(xe, weights, self.activation),
            )
            y = shd.constrain(from_groups(y, self.grouping, b, t), ("batch", "length", "embed"))

        intermediates.sow(self, "aux_loss", aux.astype(jnp.float32))
        intermediates.sow(self, "expert_load", load.astype(jnp.float32))
        intermediates.sow(self, "dropped_fraction", dropped / jnp.maximum(n_valid, 1.0))
        return y.astype(x.dtype)

    def _dropless(self, x, probs, valid, weights, layout):
        """Dropless top-k (`moe_dropless`): local, or the expert-parallel shard_map."""
        b, t, d = x.shape
        renorm = self.renormalize_top_k and self.top_k > 1
        experts, gates = dropless.top_k_routing(probs, valid, self.top_k, renorm)
        if layout is not None:
            y, load = dropless.dropless_expert_parallel(x, experts, gates, valid, weights, self.activation, layout,
                                                        self.grouped_matmul, self.block_size)
        else:
            k = self.top_k
            y, load = dropless.dropless_local(
                x.reshape(b * t, d), experts.reshape(b * t, k), gates.reshape(b * t, k), valid.reshape(b * t),
                weights, self.activation, grouped_matmul=self.grouped_matmul, block=self.block_size,
            )
            y = shd.constrain(y.reshape(b, t, d), ("batch", "length", "embed"))
        return y, load, jnp.zeros((), jnp.float32), jnp.sum(valid).astype(jnp.float32)

    def _ep_layout(self, b: int, t: int):
        """(token axes, expert axes, hidden axes) of the mesh in context for the expert-parallel
        path, from the logical rules in context (else `RULES_DEFAULT`), or None for the
        reference path; checks that the shapes split evenly over those axes."""
        mesh = jax.sharding.get_abstract_mesh()
        if not self.expert_parallel or mesh.empty:
            return None
        rules = shd.current_rules() or shd.RULES_DEFAULT
        expert_axes, hidden_axes = dropless.expert_weight_axes(mesh, rules)
        size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
        if size(expert_axes) <= 1:
            return None
        # Tokens split over the 'batch' axes and every expert axis (the dispatch all_to_all
        # trades token shards for expert shards), never over a hidden axis (its psum adds
        # partial sums of the same tokens).
        batch_axes = shd.mesh_axes("batch", mesh, rules)
        token_axes = tuple(dict.fromkeys(a for a in batch_axes + expert_axes if a not in hidden_axes))
        n_exp, n_hidden, n_tok = size(expert_axes), size(hidden_axes), size(token_axes)
        if self.num_experts % n_exp:
            raise ValueError(
                f"MoE: num_experts={self.num_experts} must be divisible by the {_axes_text(expert_axes)} "
                f"({n_exp}); change `num_experts` or the mesh shape."
            )
        if self.mlp_dim % n_hidden:
            raise ValueError(
                f"MoE: mlp_dim={self.mlp_dim} must be divisible by the {_axes_text(hidden_axes)} ({n_hidden}); "
                "change `mlp_dim` or the mesh shape."
            )
        if b % n_tok:
            raise ValueError(
                f"MoE: batch size {b} must be divisible by the {_axes_text(token_axes)} ({n_tok}) "
                "for expert parallelism; change the batch size or the mesh shape."
            )
        if self.grouping == "position" and t % n_tok:
            raise ValueError(
                f"MoE: grouping='position' reshards tokens over the sequence, so the length {t} must "
                f"be divisible by the {_axes_text(token_axes)} ({n_tok}); change the sequence "
                "length or the mesh shape, or use grouping='sequence'."
            )
        return token_axes, expert_axes, hidden_axes

    def _expert_parallel(self, x, probs, valid, weights, gs, route, token_axes, expert_axes, hidden_axes):
        """The `moe_groups` computation inside `jax.shard_map` with explicit all_to_alls."""
        regroup = self.grouping == "position"  # position groups span the token shards
        act = self.activation
        ex, hid = dropless.spec_entry(expert_axes), dropless.spec_entry(hidden_axes)

        def body(x, probs, valid, w):
            def experts(xe):  # [E, G, C, d]: send each expert shard its experts' buffers
                xe = jax.lax.all_to_all(xe, ex, 0, 1, tiled=True)  # [E/n_e, n_e*G, C, d]
                ye = expert_mlp(xe, w, act)
                if hid:
                    ye = jax.lax.psum(ye, hid)  # sum the hidden-dim partials
                return jax.lax.all_to_all(ye, ex, 1, 0, tiled=True)

            if regroup:  # [B/n, T] -> [B, T/n]: whole position groups on each device
                x = jax.lax.all_to_all(x, token_axes, 1, 0, tiled=True)
                # The mask rides along as one more float channel: one collective, no bool one.
                pv = jnp.concatenate([probs, valid[..., None].astype(probs.dtype)], axis=-1)
                pv = jax.lax.all_to_all(pv, token_axes, 1, 0, tiled=True)
                probs, valid = pv[..., :-1], pv[..., -1] > 0.5
            lb, lt = x.shape[:2]
            y, load, dropped, n_valid = moe_groups(
                to_groups(x, self.grouping, gs),
                to_groups(probs, self.grouping, gs),
                to_groups(valid, self.grouping, gs),
                route,
                experts,
            )
            y = from_groups(y, self.grouping, lb, lt).astype(x.dtype)  # send compute dtype back
            if regroup:
                y = jax.lax.all_to_all(y, token_axes, 0, 1, tiled=True)
            stats = jax.lax.psum((load, dropped, n_valid), token_axes)
            return (y, *stats)

        tok = P(token_axes)
        w_specs = {"w_in": P(ex, None, hid), "w_gate": P(ex, None, hid), "w_out": P(ex, hid, None)}
        w_specs = {k: w_specs[k] for k in weights}
        return jax.shard_map(
            body, in_specs=(tok, tok, tok, w_specs), out_specs=(tok, P(), P(), P())
        )(x, probs, valid, weights)

    # ------------------------------------------------------------------------ FLOPs
    def routing_group_tokens(self, seq_len: int, batch_size: int | None) -> int:
        """Tokens S per routing group of a buffered routing, for counting (no shape checks)."""
        if self.grouping == "position":
            if self.group_size is None and batch_size is None:
                raise ValueError("MoE with grouping='position' routes over the batch: pass batch_size (sequences per "
                                 "forward call, i.e. TrainConfig.batch_size / grad_accum_steps) to count its FLOPs.")
            return self.group_size or batch_size
        return self.group_size or seq_len

    def flop_count(self, *, seq_len: int, batch_size: int | None) -> FFWCount:
        """Router 2·d·E plus one expert MLP's FLOPs times the experts processed per token: E·C/S
        for expert choice (the capacity's floor of 1 included), top_k for token choice and
        dropless. Overhead: the one-hot dispatch/combine einsums (2·E·C·d each) and token
        choice's unfilled slots; for dropless, the other E - 1 experts per routed pair where
        `ragged_dot` runs dense (`moe_dropless.ragged_dot_is_dense`), or with 'padded_blocks'
        the static padding slots (`moe_dropless.padded_slots`, single-device layout; left out
        when batch_size is None, since it depends on the tokens per forward call)."""
        d, e, f = self.d_model, self.num_experts, self.mlp_dim
        n_in = activations.input_projections(self.activation)
        expert_flops = 2.0 * d * f * n_in + 2.0 * f * d
        if self.routing == "dropless":  # exactly top_k experts per token, no capacity
            terms = {"moe_router": 2.0 * d * e, "moe_experts": self.top_k * expert_flops}
            if self.grouped_matmul == "padded_blocks":  # the static padded slots beyond the routed pairs
                if batch_size is None:  # padding depends on the tokens per call: not counted without them
                    return FFWCount(terms, {}, d * e + self.top_k * (n_in + 1) * d * f)
                pairs = batch_size * seq_len * self.top_k
                slots = dropless.padded_slots(pairs, e, self.block_size)
                overhead = {"moe_block_padding": (slots - pairs) / (batch_size * seq_len) * expert_flops}
            elif dropless.ragged_dot_is_dense():
                overhead = {"moe_ragged_dot_dense": (e - 1) * self.top_k * expert_flops}
            else:
                overhead = {}
            return FFWCount(terms, overhead, d * e + self.top_k * (n_in + 1) * d * f)
        s = self.routing_group_tokens(seq_len, batch_size)
        c = self.capacity(s)
        slots = e * c / s  # expert-MLP evaluations per token in the buffered computation
        per_token = slots if self.routing == "expert_choice" else float(self.top_k)
        terms = {"moe_router": 2.0 * d * e, "moe_experts": per_token * expert_flops}
        overhead = {"moe_dispatch_combine": 2 * 2.0 * e * c * d}
        if slots > per_token:
            overhead["moe_empty_slots"] = (slots - per_token) * expert_flops
        return FFWCount(terms, overhead, d * e + per_token * (n_in + 1) * d * f)


def _axes_text(axes: tuple[str, ...]) -> str:
    """Error-message wording: "'expert' mesh axis", "'data' x 'expert' mesh axes"."""
    names = " x ".join(repr(a) for a in axes)
    return f"{names} mesh axis" if len(axes) <= 1 else f"{names} mesh axes"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
