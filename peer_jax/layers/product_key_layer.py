"""What PEER and PKM share: settings checks, backend ops, the table lookup, the router, the call.

Both layers are a ``ProductKeyRouter`` plus tables of ``[N, d]`` rows read through a
``TableLookup`` (``layers/expert_tables.py``); they differ only in their tables and in the
local read-out the lookup runs (PEER: ``Σ g·σ(uᵀx)·v``; PKM: ``Σ g·m``). A subclass calls
``_setup`` first (every check runs before a table is allocated), then creates its tables, then
``_make_router``: parameter keys are drawn in that order, so a seed gives the same initial
values as it always has.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from peer_jax import backends
from peer_jax import sharding as shd
from peer_jax.layers import expert_compute as ec
from peer_jax.layers import expert_decode
from peer_jax.layers import expert_tables as tables
from peer_jax.layers import intermediates
from peer_jax.layers.product_key_router import ProductKeyRouter, check_config


class ProductKeyLayer(nnx.Module):
    OWNER = "layer"  # the name errors give (PEER, PKM)

    def _setup(self, d_model: int, *, num_experts: int, heads: int, top_k: int, d_key: int, score_fn: str,
               route_chunk_tokens, compute: str, sharded_lookup: bool, grad_reduce_dtype, slot_block: int,
               decode_gather_max_tokens: int, dtype, param_dtype, extra_check=None) -> None:
        """Validates the settings (``extra_check()``, the subclass's own, after the shared ones'
        first) and keeps what the call needs."""
        owner = self.OWNER
        check_config(owner, num_experts=num_experts, heads=heads, top_k=top_k, d_key=d_key, score_fn=score_fn,
                     route_chunk_tokens=route_chunk_tokens)
        if extra_check is not None:
            extra_check()
        self.ops = backends.ops(compute, owner=owner, dtype=dtype, param_dtype=param_dtype)
        if slot_block < 1:
            raise ValueError(f"{owner} slot_block={slot_block} must be ≥ 1.")
        expert_decode.check_max_tokens(owner, decode_gather_max_tokens)
        self.gather_ops = backends.decode_ops(owner=owner, dtype=dtype, param_dtype=param_dtype)
        self.d_model, self.num_experts = d_model, num_experts
        self.compute, self.sharded_lookup = compute, sharded_lookup
        self.lookup = tables.TableLookup(owner, d_model, sharded_lookup, grad_reduce_dtype)
        self.slot_block = ec.slot_block(heads * top_k, slot_block)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.decode_gather_max_tokens = decode_gather_max_tokens

    def _make_router(self, rngs: nnx.Rngs, *, heads: int, top_k: int, d_key: int, **router_kw) -> None:
        self.router = ProductKeyRouter(
            self.d_model, rngs=rngs, num_experts=self.num_experts, heads=heads, top_k=top_k, d_key=d_key,
            ops=self.ops, dtype=self.dtype, param_dtype=self.param_dtype, owner=self.OWNER, **router_kw)

    @property
    def heads(self) -> int:
        return self.router.heads

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def _ops(self, gather: bool):
        """The layer's ops, or with ``gather`` the decode path's (one gather of all rows)."""
        return self.gather_ops if gather else self.ops

    def _route_and_read(self, read_out, tabs: tuple, x: jax.Array, *, mask, train: bool, pass_x: bool) -> jax.Array:
        """Routes ``x [B, T, d_model]``, sows ``expert_mass`` and runs ``read_out`` (the local
        read-out) through the table lookup. The decode path (``expert_decode``) is chosen here,
        once per call, for both the router's selection and the read-out."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"{self.OWNER} expects x of shape [B, T, {self.d_model}]; got {x.shape}.")
        b, t = x.shape[:2]
        gather = expert_decode.uses_gather(train, self.lookup.local_tokens(b, t), self.decode_gather_max_tokens)
        g, idx = self.router(x, mask=mask, train=train, select_topk=self._ops(gather).select_topk)
        intermediates.sow_expert_mass(self, idx, g, self.num_experts, mask)
        s = self.heads * self.top_k
        out = self.lookup(functools.partial(read_out, gather=gather), tabs, idx.reshape(b, t, s),
                          g.reshape(b, t, s), x if pass_x else None, out_dtype=x.dtype)
        return shd.constrain(out, ("batch", "length", "embed"))
