"""The dense feed-forward block (GELU MLP or SwiGLU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import sharding
from peer_jax.layers import activations
from peer_jax.layers.cost import FFWCount

ACTIVATIONS = activations.names()


# Truncated-normal fan-in init (std 1/sqrt(fan_in)); the contracted axis is always -2.
fan_in_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1)


def default_mlp_dim(d_model: int, activation: str) -> int:
    """4·d_model, or for gated units the FLOP-matched 8/3·d_model rounded up to a multiple of 8
    (the default hidden width of every dense MLP: DenseFFW, and each MoE expert)."""
    if activations.is_gated(activation):
        return 8 * ((8 * d_model // 3 + 7) // 8)
    return 4 * d_model


class DenseFFW(nnx.Module):
    """d_model → mlp_dim → d_model without biases.

    `activation="swiglu"` uses a gated unit (two input projections). `mlp_dim=None` means
    `default_mlp_dim(d_model, activation)`.
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
            mlp_dim = default_mlp_dim(d_model, activation)
        if mlp_dim <= 0:
            raise ValueError(f"DenseFFW.mlp_dim={mlp_dim} must be positive.")
        self.d_model, self.mlp_dim, self.activation, self.dtype = d_model, mlp_dim, activation, dtype
        n_in = activations.input_projections(activation)
        self.wi = nnx.Param(
            fan_in_init(rngs.params(), (n_in, d_model, mlp_dim), param_dtype), out_sharding=(None, "embed", "mlp")
        )
        self.wo = nnx.Param(fan_in_init(rngs.params(), (mlp_dim, d_model), param_dtype), out_sharding=("mlp", "embed"))

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        del mask, train  # a dense FFW is position-wise and has no batch statistics
        x = x.astype(self.dtype)
        h = jnp.einsum("btd,ndm->nbtm", x, self.wi[...].astype(self.dtype))
        h = activations.mlp(self.activation, h)
        h = sharding.constrain(h, ("batch", "length", "mlp"))
        return jnp.einsum("btm,md->btd", h, self.wo[...].astype(self.dtype))

    def flop_count(self, *, seq_len: int, batch_size: int | None) -> FFWCount:
        """``2·d·m·n_in`` in, ``2·m·d`` out; every parameter is active."""
        del seq_len, batch_size
        n_in = activations.input_projections(self.activation)
        flops = {"ffw_in": 2.0 * self.d_model * self.mlp_dim * n_in, "ffw_out": 2.0 * self.mlp_dim * self.d_model}
        return FFWCount(flops, {}, (n_in + 1) * self.d_model * self.mlp_dim)
