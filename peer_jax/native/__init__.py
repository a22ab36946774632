"""Native CPU kernels (C++, XLA FFI) for the PEER/PKM gather and scatter primitives.

``peer_kernels.cc`` implements ``gather_dot``, ``embedding_bag`` and ``scatter_outer`` (see
``peer_jax/layers/expert_compute.py`` for their maths) as multithreaded loops that read each
gathered table row straight from the table, with no ``[tokens, slots, d]`` intermediate and no
XLA gather/scatter. They are used by ``compute="native"`` in PEER and PKM, on CPU, in float32. Two token-centric
forms of the first two, ``decode_gather_dot`` and ``decode_bag`` (float32 or bfloat16 tables),
are the table reads of the layers' decode path on CPU (``backends.decode_ops``).

The library is compiled on first use with the system C++ compiler (``$CXX``, default ``g++``;
a few seconds) against the FFI headers shipped in jaxlib, with ``-march=native`` (or
``$PEER_JAX_NATIVE_MARCH``), and cached in
``$PEER_JAX_CACHE/native`` (default ``~/.cache/peer_jax/native``) under a key made of the
source, the flags, the jaxlib version and the CPU's model and feature flags, so a cache shared
between different machines never loads code built for another CPU. Concurrent first uses
(pytest-xdist workers, several hosts on one NFS home) each build into a temporary file and
rename it into place atomically.

Threads: each kernel splits its work into chunks run on XLA's intra-op thread pool (the FFI
``ThreadPool`` context), the calling thread included; ``PEER_JAX_NATIVE_THREADS`` sets the chunk
count (default: the pool's size). Chunks never write the same output element, and per-chunk
partial sums are added in chunk order, so results are deterministic.

The plain-jnp references these kernels are tested against are ``expert_compute``'s XLA loops
and ``*_naive`` functions (tests/test_native.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("peer_kernels.cc")
FLAGS = ("-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")


def _flags() -> tuple[str, ...]:
    """FLAGS plus ``-march``: ``native``, or ``$PEER_JAX_NATIVE_MARCH`` (e.g. ``x86-64`` for a
    baseline build without AVX, which the tests use to exercise the kernels' portable paths)."""
    return (*FLAGS, f"-march={os.environ.get('PEER_JAX_NATIVE_MARCH') or 'native'}")


TARGETS = {
    "gather_dot": "PeerJaxGatherDot",
    "embedding_bag": "PeerJaxEmbeddingBag",
    "scatter_outer": "PeerJaxScatterOuter",
    "product_key_topk": "PeerJaxProductKeyTopK",
    "group_by_row": "PeerJaxGroupByRow",
    "bag_small": "PeerJaxBagSmall",
    "scatter_small": "PeerJaxScatterSmall",
    "decode_gather_dot": "PeerJaxDecodeGatherDot",
    "decode_bag": "PeerJaxDecodeBag",
}


class NativeUnavailable(ValueError):
    """The native kernels cannot be built or loaded here (message says why and what to do).

    A ValueError, like every other invalid setting found at start-up: the trainer and eval CLIs
    report it in one line and exit with status 2."""


def _cpu_signature() -> str:
    """Model name and feature flags of this CPU (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    root = os.environ.get("PEER_JAX_CACHE") or Path.home() / ".cache" / "peer_jax"
    return Path(root) / "native"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise NativeUnavailable(
            f"compute='native' needs a C++17 compiler to build peer_jax/native/peer_kernels.cc, and {cxx!r} "
            "is not on PATH: install g++ (Debian: apt install g++), set $CXX, or use compute='efficient'.")
    return cxx


def library_path() -> Path:
    """Builds the kernels library if needed; returns its path."""
    cxx = _compiler()
    include = jax.ffi.include_dir()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_flags()).encode(), cxx.encode(), jax.__version__.encode(),
                                     _jaxlib_version().encode(), _cpu_signature().encode()])).hexdigest()[:16]
    path = cache_dir() / f"peer_kernels-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cxx, *_flags(), "-isystem", include, "-o", tmp, str(SOURCE), "-lpthread"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NativeUnavailable(f"building the native kernels failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}\n"
                                    "Use compute='efficient' instead.")
        os.replace(tmp, path)  # atomic: a concurrent builder's identical file may win, which is fine
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _jaxlib_version() -> str:
    import jaxlib

    return getattr(jaxlib, "__version__", "?")


@functools.cache
def _register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(library_path()))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f"peer_jax_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def ensure_available() -> None:
    """Builds and registers the kernels, or raises NativeUnavailable naming the problem."""
    if jax.default_backend() != "cpu":
        raise NativeUnavailable(f"compute='native' runs on CPU only (default backend: {jax.default_backend()}); "
                                "use compute='efficient' on accelerators.")
    _register()


def available() -> bool:
    try:
        ensure_available()
        return True
    except NativeUnavailable:
        return False


def _call(name: str, out_shape: tuple[int, ...], *args: jax.Array) -> jax.Array:
    _register()
    return jax.ffi.ffi_call(f"peer_jax_{name}", jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method="sequential")(*args)


def product_key_select(s1: jax.Array, s2: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The selection step of ``product_keys.product_key_topk`` from the half scores.

    ``s1, s2: [R, n]`` float32 scores of the two query halves against their sub-keys. Returns
    float32 scores ``[R, k]`` (descending) and int32 items ``a·n + b`` ``[R, k]``: the top-k of
    each half, the candidate sums over ``candidate_pairs(k)`` and their top-k, with
    ``jax.lax.top_k``'s tie order (lower position first). Not differentiable by itself:
    ``backends/cpu.py`` wraps it in a custom VJP."""
    _register()
    r, n = s1.shape
    out = (jax.ShapeDtypeStruct((r, k), jnp.float32), jax.ShapeDtypeStruct((r, k), jnp.int32))
    return jax.ffi.ffi_call("peer_jax_product_key_topk", out, vmap_method="sequential")(
        s1.astype(jnp.float32), s2.astype(jnp.float32), k=np.int64(k))


Groups = tuple[jax.Array, jax.Array]

# Tables up to this size (the product-key sub-key tables) are handled token-centrically, without
# grouping the pairs by row: embedding_bag and scatter_outer called without ``groups`` on such a
# table walk the tokens in order and find the rows in cache (bag_small / scatter_small kernels).
SMALL_TABLE_BYTES = 1 << 20


def small_table(rows: int, d: int) -> bool:
    """Whether a float32 ``[rows, d]`` table takes the token-centric small-table kernels."""
    return rows * d * 4 <= SMALL_TABLE_BYTES


def group_by_row(idx: jax.Array, num_rows: int) -> Groups:
    """The (token, slot) pairs of ``idx: [M, S]`` grouped by table row, for the kernels below.

    ``(start [num_rows + 1], order [M·S])`` int32: the pairs of row r are
    ``order[start[r]:start[r+1]]`` in increasing flat pair index (a stable counting sort). Compute
    it once per index array and pass it to every kernel on those indices (the custom VJPs in
    ``expert_compute`` and ``backends/cpu.py`` do). An index outside ``[0, num_rows)`` is an error."""
    _register()
    out = (jax.ShapeDtypeStruct((num_rows + 1,), jnp.int32), jax.ShapeDtypeStruct((idx.size,), jnp.int32))
    return jax.ffi.ffi_call("peer_jax_group_by_row", out, vmap_method="sequential")(idx.astype(jnp.int32))


def gather_dot(x: jax.Array, table: jax.Array, idx: jax.Array, groups: Groups | None = None) -> jax.Array:
    """float32 ``[M, S]``: ``⟨x[m], table[idx[m, s]]⟩``."""
    groups = group_by_row(idx, table.shape[0]) if groups is None else groups
    return _call("gather_dot", idx.shape, x.astype(jnp.float32), table.astype(jnp.float32), idx.astype(jnp.int32),
                 *groups)


def embedding_bag(table: jax.Array, idx: jax.Array, w: jax.Array, groups: Groups | None = None) -> jax.Array:
    """float32 ``[M, d]``: ``Σ_s w[m, s] · table[idx[m, s]]``."""
    if groups is None and small_table(table.shape[0], table.shape[-1]):
        return _call("bag_small", (idx.shape[0], table.shape[-1]), table.astype(jnp.float32),
                     idx.astype(jnp.int32), w.astype(jnp.float32))
    groups = group_by_row(idx, table.shape[0]) if groups is None else groups
    return _call("embedding_bag", (idx.shape[0], table.shape[-1]), table.astype(jnp.float32),
                 idx.astype(jnp.int32), *groups, w.astype(jnp.float32))


def scatter_outer(idx: jax.Array, w: jax.Array, y: jax.Array, num_rows: int,
                  groups: Groups | None = None) -> jax.Array:
    """float32 ``[num_rows, d]``: ``Σ_{idx[m,s]=n} w[m, s] · y[m]``."""
    if groups is None and small_table(num_rows, y.shape[-1]):
        return _call("scatter_small", (num_rows, y.shape[-1]), idx.astype(jnp.int32), w.astype(jnp.float32),
                     y.astype(jnp.float32))
    groups = group_by_row(idx, num_rows) if groups is None else groups
    return _call("scatter_outer", (num_rows, y.shape[-1]), idx.astype(jnp.int32), *groups, w.astype(jnp.float32),
                 y.astype(jnp.float32))


# ----------------------------------------------------------------------------- decode kernels
# Token-centric: each (token, slot) pair reads its row straight from the table, no grouping by
# row (which costs a pass over all N rows per call). For decode steps and short prefills, where
# the pairs touch few of the rows. Forward only: backends/cpu.py gives them a VJP.
DECODE_TABLE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


def _decode_table(table: jax.Array) -> jax.Array:
    """float32 and bfloat16 tables go to the kernel as they are (bfloat16 rows are widened per
    element inside it); any other dtype is cast to float32."""
    return table if table.dtype in DECODE_TABLE_DTYPES else table.astype(jnp.float32)


def decode_gather_dot(x: jax.Array, table: jax.Array, idx: jax.Array) -> jax.Array:
    """float32 ``[M, S]``: ``⟨x[m], table[idx[m, s]]⟩``, token-centric (float32 sums)."""
    return _call("decode_gather_dot", idx.shape, x.astype(jnp.float32), _decode_table(table), idx.astype(jnp.int32))


def decode_bag(table: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    """float32 ``[M, d]``: ``Σ_s w[m, s] · table[idx[m, s]]``, token-centric (float32 sums)."""
    return _call("decode_bag", (idx.shape[0], table.shape[-1]), _decode_table(table), idx.astype(jnp.int32),
                 w.astype(jnp.float32))
