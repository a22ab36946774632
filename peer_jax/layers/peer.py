"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

``f(x) = Σ_h Σ_{i ∈ topk_h(x)} g_{h,i}(x) · σ(u_iᵀ x) · v_i``: N single-neuron experts
``(u_i, v_i)``, retrieved per head by product keys from one shared pool, with query BatchNorm.
The retrieval (query, BatchNorm, product-key top-k, scores) is a ``ProductKeyRouter`` that this
layer holds; the layer owns the expert tables and the expert computation.

Sharding: the tables ``u, v: [N, d]`` are split along d_model and never move; the layer's
``TableLookup`` (``layers/expert_tables.py``) runs ``_experts`` on each device's column slice,
with the ``[tokens, h·k]`` partial dot products ``u_i[slice]ᵀ x[slice]`` summed over the slices.
In the memory-parallel layout the tokens' activations and routing come to the tables instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.layers import activations
from peer_jax.layers import expert_decode
from peer_jax.layers import expert_tables as tables
from peer_jax.layers.cost import FFWCount
from peer_jax.layers.product_key_layer import ProductKeyLayer


class PEER(ProductKeyLayer):
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
        same custom_vjp with its gather/scatter loops and the product-key selection as the CPU
        backend's multithreaded C++ kernels, ``peer_jax/backends/cpu.py``; exact, so
        ``approx_topk`` is ignored; CPU and float32 only, built with g++ on first use), or
        'naive' (gathers ``[tokens, h, k, d]`` twice and keeps them for backward; the reference).
        ``backends.ops`` (``peer_jax/backends/__init__.py``) tabulates the forms each one runs.
      sharded_lookup: run the lookup as the explicit shard_map of ``layers/expert_tables.py`` when
        the rules split the table columns over mesh axes of size > 1 (d-split or memory-parallel).
      grad_reduce_dtype: dtype in which the table gradients are summed over table replicas (e.g.
        ``'bfloat16'`` halves those bytes); None sums in the table's dtype.
      slot_block: slots (of the h·k per token) gathered per loop step by 'efficient'. 1 (one
        ``[tokens, d]`` gather per step) keeps the loop temporaries smallest and was fastest on
        CPU (docs/peer_speed.md); larger blocks mean fewer, larger gathers.
      approx_topk: ``jax.lax.approx_max_k`` for the sub-key top-k (not exact; meant for TPU).
      route_chunk_tokens: the product-key search runs over chunks of about this many tokens per
        device (``lax.map`` over sequence positions), so its ``[tokens, h, √N]`` score arrays and
        their gradients exist one chunk at a time (4·h·√N floats per token otherwise); None
        searches all tokens at once. Same results.
      decode_gather_max_tokens: in eval mode, a lookup over at most this many tokens (per
        device) gathers all its h·k rows at once instead of running ``compute``'s slot loop,
        and its router selects with the decode ops' top-k (the C++ selection on CPU)
        (``layers/expert_decode.py``: decode steps, short prefills); 0 never does.
      bn_momentum, bn_epsilon: query BatchNorm settings (flax defaults).
      table_init, key_init: override initialisers of u/v and of the sub-keys.
    """

    OWNER = "PEER"

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
        grad_reduce_dtype: str | None = None,
        slot_block: int = 1,
        approx_topk: bool = False,
        route_chunk_tokens: int | None = 512,
        decode_gather_max_tokens: int = expert_decode.DEFAULT_MAX_TOKENS,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-5,
        table_init=None,
        key_init=None,
    ):
        def check_activation():
            if activation not in activations.names(gated=False):
                raise ValueError(f"PEER activation={activation!r} is unknown; use one of "
                                 f"{sorted(activations.names(gated=False))}.")

        # Everything is validated before the first (possibly huge) table is allocated.
        self._setup(d_model, num_experts=num_experts, heads=heads, top_k=top_k, d_key=d_key, score_fn=score_fn,
                    route_chunk_tokens=route_chunk_tokens, compute=compute, sharded_lookup=sharded_lookup,
                    grad_reduce_dtype=grad_reduce_dtype, slot_block=slot_block,
                    decode_gather_max_tokens=decode_gather_max_tokens, dtype=dtype, param_dtype=param_dtype,
                    extra_check=check_activation)
        self.activation = activation
        init = table_init or tables.default_table_init(d_model)
        self.u = tables.table(rngs.params(), init, num_experts, d_model, param_dtype)  # input weights
        self.v = tables.table(rngs.params(), init, num_experts, d_model, param_dtype)  # output weights
        self._make_router(rngs, heads=heads, top_k=top_k, d_key=d_key, query_batchnorm=query_batchnorm,
                          score_fn=score_fn, per_head_keys=per_head_keys, approx_topk=approx_topk,
                          route_chunk_tokens=route_chunk_tokens, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                          key_init=key_init)

    # ------------------------------------------------------------------ experts

    def _experts(self, x, tabs, idx, g, reduce, gather=False) -> jax.Array:
        """``Σ_s g_s · σ(u_sᵀx) · v_s`` on one column slice of the tables (``TableLookup``);
        ``reduce`` completes ``u_sᵀx`` over the slices. ``gather``: one gather of all rows (the
        decode path of ``expert_decode``) instead of the layer's own ops."""
        u, v = tabs
        ops = self._ops(gather)
        a = reduce(ops.gather_dot(x, u, idx, dtype=self.dtype, block=self.slot_block))  # [tokens, h·k]: u_iᵀx
        coef = g.astype(jnp.float32) * activations.elementwise(self.activation)(a)
        return ops.embedding_bag(v, idx, coef, dtype=self.dtype, block=self.slot_block)

    # ------------------------------------------------------------------ call

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        """``[B, T, d_model] -> [B, T, d_model]`` in ``x.dtype``.

        ``mask`` (``[B, T]`` bool, True = real token) keeps padding out of the query BatchNorm
        statistics and out of the sown ``'expert_mass'``; outputs at padded positions are
        computed like any other and are meaningless.
        """
        return self._route_and_read(self._experts, (self.u[...], self.v[...]), x, mask=mask, train=train,
                                    pass_x=True)

    def flop_count(self, *, seq_len: int, batch_size: int | None) -> FFWCount:
        """Retrieval + h·k single-neuron experts (σ, softmax, BN not counted); active parameters:
        the router's and the h·k retrieved (u_i, v_i) pairs."""
        del seq_len, batch_size
        d, hk = self.d_model, self.heads * self.top_k
        terms = self.router.flop_terms()
        terms["expert_in"] = 2.0 * hk * d  # u_iᵀx
        terms["expert_out"] = 2.0 * hk * d  # Σ g·σ(u_iᵀx)·v_i
        return FFWCount(terms, {}, self.router.num_params() + 2 * hk * d)
