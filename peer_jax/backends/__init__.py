"""The backend seam of the product-key layers (PEER, PKM): which form of each operation runs.

A layer asks once, when it is built: ``self.ops = backends.ops(compute)``, and calls only
``self.ops.<op>``. The answer depends on the layer's ``compute`` setting and on the platform
being compiled for, and this table is the one place that decides it:

===========  ==========  ============================  ========================  =======================
compute      backend     ``project`` (query)           ``select_topk``           ``gather_dot`` /
                                                                                 ``embedding_bag``
===========  ==========  ============================  ========================  =======================
naive        portable    plain einsum (autodiff)       jnp product-key top-k     autodiff of
             cpu         einsum, custom-VJP gradient                             ``table[idx]``
efficient    portable    plain einsum (autodiff)       jnp product-key top-k     custom VJP, XLA loops
             cpu         einsum, custom-VJP gradient   jnp product-key top-k     custom VJP, XLA loops,
                                                                                 CSE-proof zeros
native       cpu only    custom VJP, ``xᵀ @ g``        C++ kernel, sparse VJP    custom VJP, C++ kernels
===========  ==========  ============================  ========================  =======================

* ``portable`` (``backends/portable.py``, ``layers/product_keys.py``, ``layers/expert_compute.py``):
  plain jnp, the reference every tuned form is tested against;
* ``cpu`` (``backends/cpu.py``): XLA:CPU-specific forms of the same maths (same values), and
  the native C++ kernels of ``peer_jax.native``.

The decode path of the layers (``layers/expert_decode.py``: eval mode, few tokens) selects
and reads through a second set, ``decode_ops()``, taken by the layer when built: on the ``cpu``
backend, where the native kernels build, ``DECODE_NATIVE`` (the C++ product-key selection, and
token-centric C++ table reads on float32 or bfloat16 tables with the gather's gradient), else
``ops('naive')`` (XLA's product-key top-k, one XLA gather + einsum).

The backend is ``cpu`` when the platform being compiled for is CPU, else ``portable``. That
platform is read when the layer is built (``platform()``: the devices of the mesh in context,
else JAX's default backend), so a model compiled ahead of time for another platform (a TPU
topology from a CPU host) is built under ``jax.set_mesh`` of that platform's mesh.
``use(name)`` forces a backend for layers built inside the block (tests, experiments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from peer_jax import native as native_kernels
from peer_jax.backends import cpu, portable
from peer_jax.layers import expert_compute as ec
from peer_jax.layers import product_keys as pk

COMPUTE_MODES = ("naive", "efficient", "native")
BACKENDS = ("cpu", "portable")


@dataclasses.dataclass(frozen=True)
class Ops:
    """The operations of a product-key layer, in one compute mode's and backend's forms.

    * ``project(x, kernel)``: float32 ``x @ kernel`` (the router's query projection);
    * ``select_topk(queries, sub_keys, top_k, *, approx, recall_target, chunk_tokens)``: the
      exact product-key top-k (``layers/product_keys.py``);
    * ``gather_dot`` and ``embedding_bag``: the differentiable table reads of
      ``layers/expert_compute.py`` (``kernels``: the loops under their custom VJPs; None for
      ``compute="naive"``, the plain-autodiff reference).

    Hashable (frozen, module-level functions): layers keep it as a static attribute.
    """

    name: str
    project: Callable
    select_topk: Callable
    kernels: ec.Kernels | None

    def gather_dot(self, x: jax.Array, table: jax.Array, idx: jax.Array, *, dtype, block: int) -> jax.Array:
        """float32 ``[M, S]``: ``⟨x[m], table[idx[m, s]]⟩`` (``block`` slots per loop step)."""
        if self.kernels is None:
            return ec.expert_dot_naive(x, table, idx, dtype)
        return ec.expert_dot(x, table, idx, np.dtype(dtype), block, self.kernels)

    def embedding_bag(self, table: jax.Array, idx: jax.Array, w: jax.Array, *, dtype, block: int) -> jax.Array:
        """float32 ``[M, d]``: ``Σ_s w[m, s] · table[idx[m, s]]``."""
        if self.kernels is None:
            return ec.embedding_bag_naive(table, idx, w, dtype)
        return ec.embedding_bag(table, idx, w, np.dtype(dtype), block, self.kernels)


@dataclasses.dataclass(frozen=True)
class DecodeOps(Ops):
    """``Ops`` whose table reads are the CPU backend's token-centric decode kernels
    (``backends/cpu.py``: float32 sums on float32 or bfloat16 tables; ``dtype`` and ``block`` do
    not apply). What ``decode_ops`` returns on CPU."""

    def gather_dot(self, x, table, idx, *, dtype, block):
        del dtype, block
        return cpu.decode_gather_dot(x, table, idx)

    def embedding_bag(self, table, idx, w, *, dtype, block):
        del dtype, block
        return cpu.decode_bag(table, idx, w)


# The selection is the C++ kernel's too: at decode sizes XLA:CPU's top-k over the
# [tokens, heads, √N] half scores is a large share of the step (docs/inference.md). Training
# keeps its compute mode's selection: the kernel's sparse backward sums in another order, and
# committed runs must re-run bit for bit.
DECODE_NATIVE = DecodeOps("decode-native/cpu", cpu.project, cpu.select_topk, None)

OPS = {
    ("naive", "portable"): Ops("naive/portable", portable.project, pk.product_key_topk, None),
    ("efficient", "portable"): Ops("efficient/portable", portable.project, pk.product_key_topk, portable.KERNELS),
    ("naive", "cpu"): Ops("naive/cpu", cpu.project, pk.product_key_topk, None),
    ("efficient", "cpu"): Ops("efficient/cpu", cpu.project, pk.product_key_topk, cpu.XLA_KERNELS),
    ("native", "cpu"): Ops("native/cpu", cpu.project_transposed_grad, cpu.select_topk, cpu.NATIVE_KERNELS),
}

_forced: list[str] = []


def platform() -> str:
    """The platform being compiled for: the mesh's devices', else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def backend(platform_name: str | None = None) -> str:
    """``cpu`` or ``portable``: the backend for ``platform_name`` (default: ``platform()``)."""
    if _forced:
        return _forced[-1]
    return "cpu" if (platform_name or platform()) == "cpu" else "portable"


def ops(compute: str = "efficient", platform_name: str | None = None, *, owner: str = "layer",
        dtype=jnp.float32, param_dtype=jnp.float32) -> Ops:
    """The ``Ops`` a layer with this ``compute`` setting runs on ``platform_name`` (default:
    ``platform()``). Validates the setting: a ValueError names it and the fix."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"{owner} compute={compute!r} is unknown; use one of {list(COMPUTE_MODES)}.")
    if compute == "native":
        cpu.check_native(owner, dtype, param_dtype)
    name = backend(platform_name)
    if (compute, name) not in OPS:
        raise ValueError(f"{owner} compute={compute!r} runs on CPU only, and this is built for "
                         f"{platform_name or platform()} (backend {name!r}); use compute='efficient'.")
    return OPS[compute, name]


@functools.cache
def _native_builds() -> bool:
    return native_kernels.available()


def decode_ops(platform_name: str | None = None, *, owner: str = "layer", dtype=jnp.float32,
               param_dtype=jnp.float32) -> Ops:
    """The ``select_topk``, ``gather_dot`` and ``embedding_bag`` of the decode path
    (``layers/expert_decode.py``): on the ``cpu`` backend, where the native kernels build,
    ``DECODE_NATIVE`` (the C++ product-key selection, exact, with its sparse VJP; table reads in
    which each pair reads its row from the table, no ``[M·h·k, d]`` gather, any table size,
    float32 or bfloat16 tables); elsewhere, or without a C++ compiler, ``ops('naive')``: XLA's
    product-key top-k, one XLA gather of all rows + einsum."""
    if backend(platform_name) == "cpu" and _native_builds():
        return DECODE_NATIVE
    return ops("naive", platform_name, owner=owner, dtype=dtype, param_dtype=param_dtype)


@contextlib.contextmanager
def use(name: str):
    """Forces backend ``name`` for the layers built inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; use one of {sorted(BACKENDS)}.")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
