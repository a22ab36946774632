"""Expert-usage statistics of the PEER paper's Table 2, as pure jnp functions.

Input is ``mass: float [N]``, the router-score mass each expert received, summed over (valid)
tokens, heads and — by the caller — over as many batches as the statistic should cover (PEER
sows one ``mass`` per call as ``nnx.Intermediate`` ``'expert_mass'``; sum them over an eval set
before calling these). Both functions are jit-friendly and take no Python branches on values.
"""

from __future__ import annotations

import math

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


def sub_key_usage(mass: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shares of the n sub-keys of each product-key half that occur in an expert with mass > 0.

    Expert ``i = a·n + b`` pairs sub-key ``a`` of the first half with ``b`` of the second
    (``layers/product_keys.py``), so ``mass`` reshaped ``[n, n]`` has the first half's sub-keys
    as rows. Usage is at most the product of the two shares: an unused sub-key kills its whole
    row (or column) of n experts.
    """
    n = math.isqrt(mass.shape[-1])
    hit = mass.reshape(n, n) > 0
    return jnp.mean(jnp.any(hit, 1).astype(jnp.float32)), jnp.mean(jnp.any(hit, 0).astype(jnp.float32))


def summary(mass) -> dict[str, float]:
    """The logged statistics of one layer's summed mass: ``usage`` (1 − usage is the share of dead
    experts), ``unevenness`` and, for product-key layers (N a perfect square), the sub-key usage
    of each half, ``key_usage_1`` and ``key_usage_2``."""
    mass = jnp.asarray(mass)
    out = {"usage": float(usage(mass)), "unevenness": float(unevenness(mass))}
    n = math.isqrt(mass.shape[-1])
    if n * n == mass.shape[-1]:
        out["key_usage_1"], out["key_usage_2"] = (float(s) for s in sub_key_usage(mass))
    return out
