"""The backend seam of the product-key layers (PEER, PKM).

Layer code calls ``backends.current().<op>`` for the few operations whose best form depends on
the platform being compiled for, and reads the same on every platform. Two implementations:

* ``portable``: plain jnp, the reference every tuned form is tested against;
* ``cpu``: XLA:CPU-specific forms of the same maths (same values), and the native C++ kernels
  of ``peer_jax.native`` behind ``compute="native"``.

``current()`` picks by the platform of the mesh in context (so an ahead-of-time compile for a
TPU topology from a CPU host gets ``portable``), else by JAX's default backend; ``use(name)``
forces one (tests, experiments).
"""

from __future__ import annotations

import contextlib
import types

import jax

from peer_jax.backends import cpu, portable

BACKENDS: dict[str, types.ModuleType] = {"cpu": cpu, "portable": portable}

_forced: list[str] = []


def platform() -> str:
    """The platform being compiled for: the mesh's devices', else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def current() -> types.ModuleType:
    """The backend module for what is being traced now (``cpu`` on CPU, else ``portable``)."""
    if _forced:
        return BACKENDS[_forced[-1]]
    return cpu if platform() == "cpu" else portable


@contextlib.contextmanager
def use(name: str):
    """Forces backend ``name`` for code traced inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; use one of {sorted(BACKENDS)}.")
    _forced.append(name)
    try:
        yield BACKENDS[name]
    finally:
        _forced.pop()
