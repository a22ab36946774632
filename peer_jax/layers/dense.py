"""The dense feed-forward block (GELU MLP or SwiGLU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import sharding

ACTIVATIONS = ("gelu", "relu", "swiglu")


# Truncated-normal fan-in init (std 1/sqrt(fan_in)); the contracted axis is always -2.
fan_in_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1)


class DenseFFW(nnx.Module):
    """d_model → mlp_dim → d_model without biases.

    `activation="swiglu"` uses a gated unit (two input projections). `mlp_dim=None` means
    4·d_model for GELU/ReLU and the FLOP-matched 8/3·d_model (rounded to 8) for SwiGLU.
    """

    def __init__(
        self,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        mlp_dim: int | None = None,
        activation: str = "gelu",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"DenseFFW.activation={activation!r}: choose one of {ACTIVATIONS}.")
        if mlp_dim is None:
            mlp_dim = 4 * d_model if activation != "swiglu" else 8 * ((8 * d_model // 3 + 7) // 8)
        if mlp_dim <= 0:
            raise ValueError(f"DenseFFW.mlp_dim={mlp_dim} must be positive.")
        self.d_model, self.mlp_dim, self.activation, self.dtype = d_model, mlp_dim, activation, dtype
        n_in = 2 if activation == "swiglu" else 1
        self.wi = nnx.Param(
            fan_in_init(rngs.params(), (n_in, d_model, mlp_dim), param_dtype), out_sharding=(None, "embed", "mlp")
        )
        self.wo = nnx.Param(fan_in_init(rngs.params(), (mlp_dim, d_model), param_dtype), out_sharding=("mlp", "embed"))

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        del mask, train  # a dense FFW is position-wise and has no batch statistics
        x = x.astype(self.dtype)
        h = jnp.einsum("btd,ndm->nbtm", x, self.wi[...].astype(self.dtype))
        if self.activation == "swiglu":
            h = jax.nn.silu(h[0]) * h[1]
        elif self.activation == "gelu":
            h = jax.nn.gelu(h[0])
        else:
            h = jax.nn.relu(h[0])
        h = sharding.constrain(h, ("batch", "length", "mlp"))
        return jnp.einsum("btm,md->btd", h, self.wo[...].astype(self.dtype))
