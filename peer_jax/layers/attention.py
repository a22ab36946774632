"""Causal multi-head self-attention with rotary positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import sharding
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
    """Pre-projected q/k/v, RoPE, `jax.nn.dot_product_attention` with a causal+segment mask."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, rope_base: float = 10_000.0):
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings.")
        self.num_heads, self.head_dim, self.dtype, self.rope_base = num_heads, head_dim, dtype, rope_base
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

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        x = x.astype(self.dtype)
        qkv = jnp.einsum("btd,sdnh->sbtnh", x, self.qkv[...].astype(self.dtype))
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = rotary(q, positions, self.rope_base)
        k = rotary(k, positions, self.rope_base)
        q = sharding.constrain(q, ("batch", "length", "heads", "kv"))
        mask = None
        if segment_ids is not None:
            # Packed sequences: attend only within the same segment. Padding (segment 0) attends
            # to padding, so no row is fully masked; its outputs never reach the loss.
            mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
        return jnp.einsum("btnh,nhd->btd", o, self.out[...].astype(self.dtype))

