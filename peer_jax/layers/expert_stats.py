"""Expert-usage statistics of the PEER paper's Table 2, as pure jnp functions.

Input is ``mass: float [N]``, the router-score mass each expert received, summed over (valid)
tokens, heads and — by the caller — over as many batches as the statistic should cover (PEER
sows one ``mass`` per call as ``nnx.Intermediate`` ``'expert_mass'``; sum them over an eval set
before calling these). Both functions are jit-friendly and take no Python branches on values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_mass(idx: jax.Array, scores: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """float32 ``[num_experts]``: scatter-add of ``scores`` at ``idx`` over all leading axes.

    ``idx, scores: [..., heads, top_k]``; ``mask: [...]`` (bool, True = count this token).
    """
    w = scores.astype(jnp.float32)
    if mask is not None:
        w = w * mask.astype(jnp.float32)[..., None, None]
    return jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(w.reshape(-1))


def usage(mass: jax.Array) -> jax.Array:
    """Share of experts with ``mass > 0`` (the paper's "expert usage"), a float32 scalar."""
    return jnp.mean((mass > 0).astype(jnp.float32))


def unevenness(mass: jax.Array) -> jax.Array:
    """``KL(z ‖ uniform) = log N + Σ z log z`` with ``z = mass / Σ mass`` and ``0·log 0 = 0``.

    0 for perfectly even use, ``log N`` when one expert gets all the mass. Computed in float32.
    """
    m = mass.astype(jnp.float32)
    z = m / jnp.sum(m)
    safe = jnp.where(z > 0, z, 1.0)  # keeps log finite where z = 0 (and its gradient NaN-free)
    return jnp.log(jnp.float32(m.shape[-1])) + jnp.sum(jnp.where(z > 0, z * jnp.log(safe), 0.0))
