"""Portable forms of the product-key layers' operations: plain jnp on every platform.

These are the references the tuned forms (``backends/cpu.py``) are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from peer_jax.layers import expert_compute as ec


def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` contracting x's last axis (the router's query projection); plain autodiff.
    Accumulated and returned in float32 whatever the input dtype (the queries feed a discrete
    top-k)."""
    return jnp.einsum("...d,dk->...k", x, kernel, preferred_element_type=jnp.float32)


def scatter_zeros(shape, dtype, tag: jax.Array) -> jax.Array:
    """The zero accumulator of a table-gradient scatter loop (``tag`` is unused here)."""
    del tag
    return jnp.zeros(shape, dtype)


def scatter_outer(idx, w, y, num_rows, out_dtype, block, groups=None):
    """``expert_compute.scatter_loop`` into ``jnp.zeros``."""
    del groups
    return ec.scatter_loop(idx, w, y, num_rows, out_dtype, block, zeros=scatter_zeros)


# The XLA loops under the custom VJPs of compute="efficient".
KERNELS = ec.Kernels(dot=ec.dot_loop, bag=ec.bag_loop, scatter=scatter_outer)
