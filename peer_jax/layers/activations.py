"""The one activation registry of the FFW layers (dense MLP, MoE experts, PEER experts).

Element-wise activations apply to one pre-activation; a gated unit (SwiGLU) takes two input
projections and multiplies the activated first by the second. Layers validate their
``activation`` setting against ``names(...)`` and apply it with ``elementwise`` or ``mlp``.
"""

from __future__ import annotations

import jax

ELEMENTWISE = {
    # jax.nn.gelu's default tanh approximation; the PEER paper does not say which GELU it used.
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
}

# Gated units: name -> the activation of the gate (the first of the two input projections).
GATED = {"swiglu": jax.nn.silu}


def names(*, gated: bool = True) -> tuple[str, ...]:
    """Valid activation names: all, or only the element-wise ones (``gated=False``)."""
    return (*ELEMENTWISE, *GATED) if gated else tuple(ELEMENTWISE)


def is_gated(name: str) -> bool:
    return name in GATED


def input_projections(name: str) -> int:
    """How many input projections an MLP with this activation has (2 for gated units)."""
    return 2 if is_gated(name) else 1


def elementwise(name: str):
    """The element-wise function of ``name`` (a KeyError for gated or unknown names)."""
    return ELEMENTWISE[name]


def mlp(name: str, h: jax.Array) -> jax.Array:
    """The hidden activation of an MLP from its stacked input projections ``h: [n_in, ...]``."""
    if is_gated(name):
        return GATED[name](h[0]) * h[1]
    return ELEMENTWISE[name](h[0])
