"""Portable forms of the backend-dependent operations: plain jnp on every platform.

These are the references the tuned forms (``backends/cpu.py``) are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def project(x: jax.Array, kernel: jax.Array, *, transposed_grad: bool = False) -> jax.Array:
    """``x @ kernel`` contracting x's last axis (the router's query projection); plain autodiff.
    Accumulated and returned in float32 whatever the input dtype (the queries feed a discrete
    top-k). ``transposed_grad`` selects a CPU form of the kernel gradient and is ignored here."""
    del transposed_grad
    return jnp.einsum("...d,dk->...k", x, kernel, preferred_element_type=jnp.float32)


def scatter_zeros(shape, dtype, tag: jax.Array) -> jax.Array:
    """The zero accumulator of a table-gradient scatter loop (``tag`` is unused here)."""
    del tag
    return jnp.zeros(shape, dtype)
