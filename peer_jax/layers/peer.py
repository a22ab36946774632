"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

``f(x) = Σ_h Σ_{i ∈ topk_h(x)} g_{h,i}(x) · σ(u_iᵀ x) · v_i``: N single-neuron experts
``(u_i, v_i)``, retrieved per head by product keys from one shared pool, with query BatchNorm.

Sharding (Memory Layers at Scale, Berges et al. 2024): under a mesh whose ``model`` axis has
size > 1, the tables ``u, v: [N, d]`` are split along **d_model** (logical ``expert_embed``),
not along experts. Inside ``jax.shard_map`` every device gathers *its d-slice* of every
retrieved row for *its* tokens, computes partial dot products ``u_i[slice]ᵀ x[slice]``, and a
``psum`` over ``model`` of only the ``[tokens, h·k]`` scalars completes ``u_iᵀx``; activation
and router weights are applied locally, and each device writes its d-slice of the output.
Communication per token is h·k floats, independent of d and of which experts were picked.
The alternative — sharding the expert axis — would route each token to the devices owning its
h·k experts: an all-to-all of d-sized token vectors (and back) whose destinations are
data-dependent and, with 10⁶ experts and h·k = 128 random picks, effectively hit every device,
i.e. ~h·k·d values moved per token plus load imbalance. The d-split also keeps every gather
local and every device equally loaded. If the rules additionally shard the expert rows (over
``expert``), the shard_map's in_specs make the compiler all-gather those rows first (FSDP
style: the backward pass reduce-scatters the gradient).

Outside a mesh, or when the ``model`` axis (more precisely, the mesh axes the rules assign to
``expert_embed``) has size 1, the plain single-device computation is used and the compiler
partitions it along the batch.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from peer_jax import sharding as shd
from peer_jax.layers import expert_compute as ec
from peer_jax.layers import intermediates
from peer_jax.layers.expert_stats import expert_mass
from peer_jax.layers.product_keys import product_key_topk

SCORE_FNS = ("softmax", "sigmoid")

# Initialisers (the paper does not give them). u ~ N(0, 1/d): u_iᵀx has unit scale for a
# unit-variance (pre-normed) input, so σ starts in its non-linear range. v ~ N(0, 1/d) as well:
# each expert output then has O(1/√d) entries, and with softmax weights summing to one per head
# the layer output starts small (≈ √h/√d per entry), like a residual branch should.
# Sub-keys ~ N(0, 1/(d_key/2)) give O(1) half-scores for a BatchNormed query.
def _default_table_init(d_model: int):
    return jax.nn.initializers.normal(stddev=1.0 / math.sqrt(d_model))


def _default_key_init(d_key: int):
    return jax.nn.initializers.normal(stddev=1.0 / math.sqrt(d_key // 2))


def _axes_tuple(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _fit(entry, dim: int, mesh) -> str | tuple[str, ...] | None:
    """Drops trailing mesh axes from a spec entry until their product divides ``dim``."""
    axes = _axes_tuple(entry)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: jax.Array, kernel: jax.Array, transposed_grad: bool = False) -> jax.Array:
    """``x @ kernel`` (contracting x's last axis), as ``nnx.Linear`` without bias computes it.

    The custom VJP only fixes the *form* of the kernel gradient: ``dW = Σ_t x[t]ᵀ g[t]`` as one
    ``einsum('td,tk->dk')``. Plain autodiff emits ``dot(g, x)`` followed by a transpose, which
    XLA:CPU lowers by materialising ``gᵀ`` fused into the query-BatchNorm backward: a strided
    ``[tokens, h·d_key]`` transpose that took longer than the three matmuls of the projection
    together (~80 of ~800 ms CPU per PEER step at d=256, 2048 tokens; measured). Same values.

    ``transposed_grad`` (what ``compute="native"`` uses): on CPU, compute the kernel gradient as
    ``xᵀ @ g`` with ``xᵀ`` materialised behind an optimization barrier. XLA:CPU leaves a dot that
    contracts the leading axes to Eigen, which took 24 ms of CPU against 13 ms for the
    XNNPACK-fused dot on the transposed copy (one core, [2048, 256]ᵀ·[2048, 1024]; the copy is
    2 MiB). The sums then run in another order, so the other compute modes keep the einsum: their
    committed results stay bit-for-bit reproducible. Other platforms (and an AOT compile for TPU
    from a CPU host, via ``lax.platform_dependent``) always keep the einsum.
    """
    return jnp.einsum("...d,dk->...k", x, kernel)


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


def _batch_shards() -> int:
    """How many ways the current mesh and rules split the batch (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = _axes_tuple(shd.logical_to_spec(("batch",), shd.current_rules() or shd.RULES_DEFAULT)[0])
    return math.prod(mesh.shape[a] for a in axes if a in mesh.axis_names)


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Marks ``x`` as varying over ``axes`` inside shard_map (its transpose is a psum)."""
    missing = tuple(a for a in axes if a not in ec.varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


class PEER(nnx.Module):
    """The PEER layer; a drop-in FFW: ``__call__(x [B,T,d], *, mask, train) -> [B,T,d]``.

    Args:
      d_model: model width.
      rngs: initialisation rngs (``params`` stream).
      dtype: compute dtype (gathers, dots); scores, softmax and statistics are float32.
      param_dtype: parameter dtype.
      num_experts: N, a perfect square (n = √N rows per sub-key table). Paper: 1024².
      heads: h independent queries sharing one expert pool and one set of product keys.
      top_k: experts retrieved per head (≤ √N). Paper: 16.
      d_key: query / product-key width (even). Not given in the paper; 128 as in PKM.
      activation: 'gelu' or 'relu' (σ of each single-neuron expert).
      query_batchnorm: BatchNorm on the query (the paper's default). Batch statistics are taken
        over valid tokens only in training; running statistics are used at eval.
      score_fn: 'softmax' over each head's top-k (paper) or 'sigmoid' per retrieved expert.
      per_head_keys: one sub-key set per head (PKM / PEER-pytorch) instead of one shared set.
      compute: 'efficient' (custom_vjp gather loops, memory O(tokens·block·d)), 'native' (the
        same custom_vjp with its gather/scatter loops as multithreaded C++ kernels through the
        XLA FFI, ``peer_jax.native``, and the product-key selection as one C++ kernel with a
        sparse backward pass; exact, so ``approx_topk`` is ignored; CPU and float32 only,
        built with g++ on first use), or
        'naive' (gathers ``[tokens, h, k, d]`` twice and keeps them for backward; the reference).
      sharded_lookup: use the d-split shard_map lookup when the mesh has a ``model`` axis > 1.
      slot_block: slots (of the h·k per token) gathered per loop step by 'efficient'. 1 (one
        ``[tokens, d]`` gather per step) was fastest on CPU (forward+backward at d=256, N=256²,
        2048 tokens: 8 → 1 cut 14 % of the step's CPU time; d=512, N=512²: 3 %) and keeps the
        loop temporaries smallest; larger blocks mean fewer, larger gathers.
      approx_topk: ``jax.lax.approx_max_k`` for the sub-key top-k (not exact; TPU speed-up).
      route_chunk_tokens: the product-key search runs over chunks of about this many tokens per
        device (``lax.map`` over sequence positions), so its ``[tokens, h, √N]`` score arrays and
        their gradients exist one chunk at a time (4·h·√N floats per token otherwise: 32 KiB per
        token at the paper's h = 8, N = 1024²); None searches all tokens at once. Same results.
      bn_momentum, bn_epsilon: query BatchNorm settings (flax defaults).
      table_init, key_init: override initialisers of u/v and of the sub-keys.
    """

    def __init__(
        self,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        num_experts: int = 1024**2,
        heads: int = 8,
        top_k: int = 16,
        d_key: int = 128,
        activation: str = "gelu",
        query_batchnorm: bool = True,
        score_fn: str = "softmax",
        per_head_keys: bool = False,
        compute: str = "efficient",
        sharded_lookup: bool = True,
        slot_block: int = 1,
        approx_topk: bool = False,
        route_chunk_tokens: int | None = 512,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-5,
        table_init=None,
        key_init=None,
    ):
        n = math.isqrt(num_experts) if num_experts > 0 else 0
        if num_experts < 1 or n * n != num_experts:
            raise ValueError(
                f"{type(self).__name__} num_experts={num_experts} must be a perfect square (product keys pair "
                f"√N × √N sub-keys); use e.g. {max(n, 1) ** 2} or {(n + 1) ** 2}."
            )
        if d_key < 2 or d_key % 2:
            raise ValueError(f"{type(self).__name__} d_key={d_key} must be a positive even number (it is split in halves).")
        if heads < 1:
            raise ValueError(f"{type(self).__name__} heads={heads} must be ≥ 1.")
        if not 1 <= top_k <= n:
            raise ValueError(
                f"{type(self).__name__} top_k={top_k} must be between 1 and √num_experts={n}: each half of the "
                f"product key contributes its top-k of {n} sub-keys. Lower top_k or raise num_experts."
            )
        if activation not in ec.ACTIVATIONS:
            raise ValueError(f"{type(self).__name__} activation={activation!r} is unknown; use one of {sorted(ec.ACTIVATIONS)}.")
        if score_fn not in SCORE_FNS:
            raise ValueError(f"{type(self).__name__} score_fn={score_fn!r} is unknown; use one of {list(SCORE_FNS)}.")
        ec.check_compute(type(self).__name__, compute, dtype, param_dtype)
        if slot_block < 1:
            raise ValueError(f"{type(self).__name__} slot_block={slot_block} must be ≥ 1.")
        if route_chunk_tokens is not None and route_chunk_tokens < 1:
            raise ValueError(f"{type(self).__name__} route_chunk_tokens={route_chunk_tokens} must be ≥ 1 or None.")

        self.d_model, self.num_experts, self.n_sub = d_model, num_experts, n
        self.heads, self.top_k, self.d_key = heads, top_k, d_key
        self.activation, self.score_fn, self.compute = activation, score_fn, compute
        self.per_head_keys, self.sharded_lookup = per_head_keys, sharded_lookup
        self.slot_block = ec.slot_block(heads * top_k, slot_block)
        self.approx_topk, self.route_chunk_tokens = approx_topk, route_chunk_tokens
        self.dtype, self.param_dtype = dtype, param_dtype

        self._init_tables(rngs, table_init or _default_table_init(d_model))
        key_init = key_init or _default_key_init(d_key)
        key_shape = (2, n, d_key // 2)
        key_names: tuple[str | None, ...] = (None, "keys", "key_dim")
        if per_head_keys:
            key_shape, key_names = (heads, *key_shape), (None, *key_names)
        self.sub_keys = nnx.Param(key_init(rngs.params(), key_shape, param_dtype), out_sharding=key_names)

        self.query = nnx.Linear(
            d_model, heads * d_key, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_metadata={"out_sharding": ("embed", "key_dim")},
        )
        self.query_bn = (
            nnx.BatchNorm(
                heads * d_key, momentum=bn_momentum, epsilon=bn_epsilon, dtype=jnp.float32,
                param_dtype=param_dtype, rngs=rngs,
                scale_metadata={"out_sharding": ("key_dim",)}, bias_metadata={"out_sharding": ("key_dim",)},
            )
            if query_batchnorm
            else None
        )

    def _init_tables(self, rngs: nnx.Rngs, init) -> None:
        """The expert pool: ``u`` (input weights) and ``v`` (output weights), ``[N, d]`` each."""
        shape, names = (self.num_experts, self.d_model), ("experts", "expert_embed")
        self.u = nnx.Param(init(rngs.params(), shape, self.param_dtype), out_sharding=names)
        self.v = nnx.Param(init(rngs.params(), shape, self.param_dtype), out_sharding=names)

    # ------------------------------------------------------------------ routing

    def route(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False):
        """Router weights and expert indices, each ``[B, T, heads, top_k]`` (float32, int32)."""
        b, t, _ = x.shape
        q = _project(x.astype(self.dtype), self.query.kernel[...].astype(self.dtype),  # == self.query(x)
                     self.compute == "native")
        if self.query_bn is not None:
            bn_mask = None
            if train and mask is not None:
                # An all-padding batch would give 0/0 statistics and poison the running
                # averages; fall back to all tokens then (their outputs are discarded anyway).
                bn_mask = (mask | ~jnp.any(mask))[..., None]
            q = self.query_bn(q, use_running_average=not train, mask=bn_mask)
        q = q.astype(self.dtype).reshape(b, t, self.heads, self.d_key)
        chunk = None if self.route_chunk_tokens is None else self.route_chunk_tokens * _batch_shards()
        scores, idx = product_key_topk(q, self.sub_keys[...], self.top_k, approx=self.approx_topk,
                                       chunk_tokens=chunk, native=self.compute == "native")
        g = jax.nn.softmax(scores, axis=-1) if self.score_fn == "softmax" else jax.nn.sigmoid(scores)
        return g, idx

    # ------------------------------------------------------------------ experts

    def _lookup_axes(self) -> tuple[tuple[str, ...], shd.LogicalRules] | None:
        """Mesh axes that split d_model of the tables, or None for the single-device path."""
        if not self.sharded_lookup:
            return None
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return None
        rules = shd.current_rules() or shd.RULES_DEFAULT
        axes = _axes_tuple(shd.logical_to_spec(("expert_embed",), rules)[0])
        axes = tuple(a for a in axes if a in mesh.axis_names)
        size = math.prod(mesh.shape[a] for a in axes)
        if size == 1:
            return None
        if self.d_model % size:
            raise ValueError(
                f"{type(self).__name__} d_model={self.d_model} is not divisible by the size {size} of mesh axes "
                f"{axes} that shard the expert tables along d_model; change the mesh or set "
                f"{type(self).__name__}(sharded_lookup=False)."
            )
        return axes, rules

    def _experts_local(self, x, idx, g) -> jax.Array:
        b, t, d = x.shape
        s = self.heads * self.top_k
        out = ec.peer_experts(
            x.reshape(b * t, d), self.u[...], self.v[...], idx.reshape(b * t, s), g.reshape(b * t, s),
            activation=self.activation, compute=self.compute, dtype=self.dtype, block=self.slot_block,
        )
        return out.reshape(b, t, d)

    @staticmethod
    def _lookup_specs(b: int, t: int, model_axes: tuple[str, ...], rules):
        """(activation spec, routing spec, table spec, all axes) of the d-split shard_map."""
        mesh = jax.sharding.get_abstract_mesh()
        tok_spec = shd.logical_to_spec(("batch", "length"), rules)
        # Axes already used for d may not shard tokens too; also require even splits.
        batch_e = _fit(tuple(a for a in _axes_tuple(tok_spec[0]) if a not in model_axes), b, mesh)
        length_e = _fit(
            tuple(a for a in _axes_tuple(tok_spec[1]) if a not in model_axes + _axes_tuple(batch_e)), t, mesh
        )
        model_e = model_axes[0] if len(model_axes) == 1 else model_axes
        token_axes = _axes_tuple(batch_e) + _axes_tuple(length_e)
        all_axes = token_axes + model_axes
        return P(batch_e, length_e, model_e), P(batch_e, length_e, None), P(None, model_e), all_axes

    def _experts_sharded(self, x, idx, g, model_axes: tuple[str, ...], rules) -> jax.Array:
        """The d-split lookup of the module docstring, as an explicit ``jax.shard_map``."""
        b, t, d = x.shape
        s = self.heads * self.top_k
        x_spec, route_spec, table_spec, all_axes = self._lookup_specs(b, t, model_axes, rules)
        act = ec.ACTIVATIONS[self.activation]
        compute, dtype, block = self.compute, self.dtype, self.slot_block

        def local(x, u, v, idx, g):
            lb, lt, ld = x.shape
            xm, idxm, gm = x.reshape(lb * lt, ld), idx.reshape(lb * lt, s), g.reshape(lb * lt, s)
            # Every operand of a gather-compute varies over tokens *and* d-slices; the pcast's
            # transpose sums table grads over token shards and router grads over d-slices.
            a_part = ec.expert_pre_activations(
                _vary(xm, all_axes), _vary(u, all_axes), _vary(idxm, all_axes),
                compute=compute, dtype=dtype, block=block,
            )
            a = jax.lax.psum(a_part, model_axes)  # [tokens, h·k] scalars: the only collective
            coef = gm.astype(jnp.float32) * act(a)
            out = ec.expert_outputs(
                _vary(v, all_axes), _vary(idxm, all_axes), _vary(coef, all_axes),
                compute=compute, dtype=dtype, block=block,
            )
            return out.reshape(lb, lt, ld)

        fn = jax.shard_map(
            local,
            in_specs=(x_spec, table_spec, table_spec, route_spec, route_spec),
            out_specs=x_spec,
        )
        return fn(x, self.u[...], self.v[...], idx.reshape(b, t, s), g.reshape(b, t, s))

    # ------------------------------------------------------------------ call

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        """``[B, T, d_model] -> [B, T, d_model]`` in ``x.dtype``.

        ``mask`` (``[B, T]`` bool, True = real token) keeps padding out of the query BatchNorm
        statistics and out of the sown ``'expert_mass'``; outputs at padded positions are
        computed like any other and are meaningless.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects x of shape [B, T, {self.d_model}]; got {x.shape}.")
        g, idx = self.route(x, mask=mask, train=train)
        self._sow_mass(idx, g, mask)
        sharded = self._lookup_axes()
        if sharded is None:
            out = self._experts_local(x, idx, g)
        else:
            out = self._experts_sharded(x, idx, g, *sharded)
        return shd.constrain(out.astype(x.dtype), ("batch", "length", "embed"))

    def _sow_mass(self, idx, g, mask) -> None:
        """Sows float32 ``[N]`` router mass per expert over valid tokens and heads (under
        ``nnx.capture`` only; see ``layers/intermediates.py``)."""
        if not hasattr(self, "__captures__"):
            return  # skip the scatter when nobody collects it
        mass = expert_mass(idx, jax.lax.stop_gradient(g), self.num_experts, mask)
        intermediates.sow(self, "expert_mass", mass)
