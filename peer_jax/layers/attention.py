"""Causal multi-head self-attention with rotary positions.

The attention kernel itself (XLA's or the Pallas splash kernel on TPU) is chosen by ``impl``
behind ``peer_jax/backends/attention.py``. The q/k/v and output projections are tagged with
``checkpoint_name`` ('qkv_proj', 'out_proj') for the named remat policies of
``models/remat.py``; a name is the identity on values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from peer_jax import sharding
from peer_jax.backends import attention as attention_kernels
from peer_jax.layers.dense import fan_in_init


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (half-split form) on x: [B, T, N, H], positions: [B, T]."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Pre-projected q/k/v, RoPE, causal+segment-masked attention.

    ``impl``: 'auto' (splash on TPU when T is a multiple of 128, else XLA), 'xla' or 'splash'
    (see ``backends/attention.py``).
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, rope_base: float = 10_000.0, impl: str = "auto"):
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings.")
        if impl not in attention_kernels.IMPLS:
            raise ValueError(f"Attention impl={impl!r} is unknown; use one of {list(attention_kernels.IMPLS)}.")
        self.num_heads, self.head_dim, self.dtype, self.rope_base = num_heads, head_dim, dtype, rope_base
        self.impl = impl
        self.qkv = nnx.Param(
            fan_in_init(rngs.params(), (3, d_model, num_heads * head_dim), param_dtype).reshape(
                3, d_model, num_heads, head_dim
            ),
            out_sharding=(None, "embed", "heads", "kv"),
        )
        self.out = nnx.Param(
            fan_in_init(rngs.params(), (num_heads * head_dim, d_model), param_dtype).reshape(num_heads, head_dim, d_model),
            out_sharding=("heads", "kv", "embed"),
        )

    def _project(self, x: jax.Array, positions: jax.Array):
        """(q, k, v), each ``[B, T, N, H]``, with rotary positions on q and k."""
        x = x.astype(self.dtype)
        qkv = checkpoint_name(jnp.einsum("btd,sdnh->sbtnh", x, self.qkv[...].astype(self.dtype)), "qkv_proj")
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = rotary(q, positions, self.rope_base)
        k = rotary(k, positions, self.rope_base)
        return sharding.constrain(q, ("batch", "length", "heads", "kv")), k, v

    def _output(self, o: jax.Array) -> jax.Array:
        return checkpoint_name(jnp.einsum("btnh,nhd->btd", o, self.out[...].astype(self.dtype)), "out_proj")

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        q, k, v = self._project(x, positions)
        # Packed sequences attend only within their segment (backends/attention.py).
        o = attention_kernels.attend(q, k, v, segment_ids, self.impl)
        return self._output(o)

    def decode(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, k_cache: jax.Array,
               v_cache: jax.Array, cache_segment_ids: jax.Array, index: jax.Array):
        """``__call__`` for T new tokens at cache columns ``index .. index+T-1``, attending to
        the cached keys/values of the earlier columns: (output, k_cache, v_cache).

        ``k_cache``/``v_cache``: ``[B, L, N, H]``; ``cache_segment_ids``: ``[B, L]``, already
        holding ``segment_ids`` at the new columns (0 = padding, as in ``__call__``).
        """
        q, k, v = self._project(x, positions)
        start = (0, index, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
        o = attention_kernels.cached_attention(q, k_cache, v_cache, segment_ids, cache_segment_ids, index)
        return self._output(o), k_cache, v_cache
