"""PKM: Product Key Memory (Lample et al. 2019), the paper's other fine-grained baseline.

``f(x) = Σ_h Σ_{i ∈ topk_h(x)} g_{h,i}(x) · m_i``: a value table ``m: [N, d]`` read as a
weighted embedding bag, addressed by a ``ProductKeyRouter`` (multi-head queries, query
BatchNorm, product keys) like PEER's. Paper setting: N = 1024², h = 8, k = 32, query BN.

The read-out is the memory-efficient custom-VJP ``embedding_bag`` of ``expert_compute`` (no
``[tokens, h·k, d]`` gather is kept for the backward pass); ``expert_mass`` is sown per call as
in PEER, so usage/unevenness are defined the same way. Sharding: the value table is split along
d_model and read through the same ``TableLookup`` as PEER's tables (``layers/expert_tables.py``);
no sum crosses the column slices, so the d-split lookup needs no collective in the forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.layers import expert_decode
from peer_jax.layers import expert_tables as tables
from peer_jax.layers.cost import FFWCount
from peer_jax.layers.product_key_layer import ProductKeyLayer


class PKM(ProductKeyLayer):
    """A drop-in FFW: ``__call__(x [B,T,d], *, mask, train) -> [B,T,d]``.

    Arguments mean what PEER's do (PKM has no ``activation``: memories are read linearly), with
    PKM's defaults: ``num_experts`` (memories) = 1024², ``heads`` = 8, ``top_k`` = 32,
    ``d_key`` = 128. Values are initialised N(0, 1/d) (Lample et al.: N(0, d^-0.5)).
    """

    OWNER = "PKM"

    def __init__(
        self,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        num_experts: int = 1024**2,
        heads: int = 8,
        top_k: int = 32,
        d_key: int = 128,
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
        self._setup(d_model, num_experts=num_experts, heads=heads, top_k=top_k, d_key=d_key, score_fn=score_fn,
                    route_chunk_tokens=route_chunk_tokens, compute=compute, sharded_lookup=sharded_lookup,
                    grad_reduce_dtype=grad_reduce_dtype, slot_block=slot_block,
                    decode_gather_max_tokens=decode_gather_max_tokens, dtype=dtype, param_dtype=param_dtype)
        init = table_init or tables.default_table_init(d_model)
        self.values = tables.table(rngs.params(), init, num_experts, d_model, param_dtype)
        self._make_router(rngs, heads=heads, top_k=top_k, d_key=d_key, query_batchnorm=query_batchnorm,
                          score_fn=score_fn, per_head_keys=per_head_keys, approx_topk=approx_topk,
                          route_chunk_tokens=route_chunk_tokens, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                          key_init=key_init)

    def _read(self, x, tabs, idx, g, reduce, gather=False) -> jax.Array:
        """``Σ_s g_s · m_s`` on one column slice of the table (``TableLookup``); no sum crosses
        the slices, so ``x`` and ``reduce`` are unused. ``gather``: one gather of all rows (the
        decode path of ``expert_decode``) instead of the layer's own ops."""
        del x, reduce
        (values,) = tabs
        return self._ops(gather).embedding_bag(values, idx, g.astype(jnp.float32), dtype=self.dtype, block=self.slot_block)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        """``[B, T, d_model] -> [B, T, d_model]`` in ``x.dtype`` (``mask`` as in PEER)."""
        return self._route_and_read(self._read, (self.values[...],), x, mask=mask, train=train, pass_x=False)

    def flop_count(self, *, seq_len: int, batch_size: int | None) -> FFWCount:
        """Retrieval + an embedding bag of h·k value rows (softmax, BN not counted). The memories
        are read linearly (no u_iᵀx, no activation) and have the model width, so the layer has
        no output projection."""
        del seq_len, batch_size
        hk, d_value = self.heads * self.top_k, self.values.shape[-1]
        terms = self.router.flop_terms()
        terms["memory_bag"] = 2.0 * hk * d_value  # Σ g·m_i
        return FFWCount(terms, {}, self.router.num_params() + hk * d_value)
