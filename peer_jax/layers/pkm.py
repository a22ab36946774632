"""PKM: Product Key Memory (Lample et al. 2019), the paper's other fine-grained baseline.

``f(x) = Σ_h Σ_{i ∈ topk_h(x)} g_{h,i}(x) · m_i``: a value table ``m: [N, d]`` read as a
weighted embedding bag, addressed by the same product keys, multi-head queries and query
BatchNorm as PEER. Paper setting: N = 1024², h = 8, k = 32, query BN.

Everything but the expert compute is PEER's (this class extends it): routing, validation,
statistics (``expert_mass`` sown per call, so usage/unevenness are defined as for PEER), the
memory-efficient custom-VJP `embedding_bag` (no ``[tokens, h·k, d]`` gather is kept for the
backward pass), and the sharding choice — the value table is split along d_model over the
``model`` axis. The sharded lookup needs no collective at all: each device gathers its d-slice
of every retrieved row and writes its d-slice of the output; only the router-weight gradient
is summed over the slices (the transpose of the ``pcast`` to varying).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.layers import expert_compute as ec
from peer_jax.layers.peer import PEER, _vary


class PKM(PEER):
    """A drop-in FFW: ``__call__(x [B,T,d], *, mask, train) -> [B,T,d]``.

    Arguments are PEER's (``activation`` is unused: memories are read linearly), with PKM's
    defaults: ``num_experts`` (memories) = 1024², ``heads`` = 8, ``top_k`` = 32, ``d_key`` = 128.
    Values are initialised N(0, 1/d) (Lample et al.: N(0, d^-0.5)).
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_experts: int = 1024**2, heads: int = 8, top_k: int = 32,
                 **kwargs):
        kwargs.setdefault("table_init", jax.nn.initializers.normal(stddev=1.0 / math.sqrt(d_model)))
        super().__init__(d_model, rngs=rngs, num_experts=num_experts, heads=heads, top_k=top_k, **kwargs)

    def _init_tables(self, rngs: nnx.Rngs, init) -> None:
        shape, names = (self.num_experts, self.d_model), ("experts", "expert_embed")
        self.values = nnx.Param(init(rngs.params(), shape, self.param_dtype), out_sharding=names)

    def _experts_local(self, x, idx, g) -> jax.Array:
        b, t, d = x.shape
        s = self.heads * self.top_k
        out = ec.expert_outputs(self.values[...], idx.reshape(b * t, s), g.reshape(b * t, s).astype(jnp.float32),
                                compute=self.compute, dtype=self.dtype, block=self.slot_block)
        return out.reshape(b, t, d)

    def _experts_sharded(self, x, idx, g, model_axes: tuple[str, ...], rules) -> jax.Array:
        b, t, _ = x.shape
        s = self.heads * self.top_k
        x_spec, route_spec, table_spec, all_axes = self._lookup_specs(b, t, model_axes, rules)
        compute, dtype, block = self.compute, self.dtype, self.slot_block

        def local(values, idx, g):
            lb, lt, _ = idx.shape
            idxm, gm = idx.reshape(lb * lt, s), g.reshape(lb * lt, s).astype(jnp.float32)
            out = ec.expert_outputs(_vary(values, all_axes), _vary(idxm, all_axes), _vary(gm, all_axes),
                                    compute=compute, dtype=dtype, block=block)
            return out.reshape(lb, lt, values.shape[-1])

        fn = jax.shard_map(local, in_specs=(table_spec, route_spec, route_spec), out_specs=x_spec)
        return fn(self.values[...], idx.reshape(b, t, s), g.reshape(b, t, s))
