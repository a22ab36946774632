"""Process-level settings for fast CPU runs: glibc's allocator.

XLA:CPU allocates every large output and temporary fresh on each step. By default glibc serves
allocations over 32 MiB with ``mmap`` and gives them back with ``munmap`` on free, so every step
page-faults each 4 KiB page of them again (~3.5 µs per fault on the project's VM: a fresh 64 MiB
buffer costs ~45 ms before a byte is computed). PEER's ``[N, d]`` table gradients are exactly
such buffers. ``configure_malloc("tuned")`` calls ``mallopt`` so that freed memory is kept and
reused instead:

* ``M_ARENA_MAX = 1``: one heap for all threads (XLA's worker threads would otherwise each get a
  per-thread arena whose heaps are capped at 64 MiB, where large blocks cannot live);
* ``M_MMAP_MAX = 0``: never serve an allocation with mmap;
* ``M_TRIM_THRESHOLD = -1``: never return the heap's free top to the OS (glibc: -1 disables trimming).

Measured (d = 256, N = 256², 2048 tokens, forward+backward of the PEER layer, one process):
page faults per step 47k → 6.5k (compute='efficient') and 44k → 0 ('native'); step time
621 → 536 ms and 349 → 235 ms. The price: the process's RSS stays at its high-water mark
(freed memory is reused by the process, not returned), which is what a training loop wants.

``M_ARENA_MAX`` only binds threads that have not allocated yet, so this must run before the JAX
backend starts its thread pool: the command-line entry points call it first thing. ``auto`` (the
default, or ``$PEER_JAX_MALLOC``) tunes only where JAX will run on the CPU (``JAX_PLATFORMS``
names only cpu, or no accelerator plugin is installed), since on TPU/GPU hosts host memory is
not the bottleneck and a single arena could slow down multi-threaded input pipelines.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform

MODES = ("auto", "tuned", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_plugins")
_applied: str | None = None


def _cpu_only() -> bool:
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    return not any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_PLUGINS)


def configure_malloc(mode: str | None = None) -> str:
    """Applies the allocator ``mode`` ('auto', 'tuned' or 'system'); returns what was applied.

    Idempotent. 'tuned' on a platform without glibc is reported and skipped ('system')."""
    global _applied
    mode = mode or os.environ.get("PEER_JAX_MALLOC", "auto")
    if mode not in MODES:
        raise ValueError(f"PEER_JAX_MALLOC={mode!r} is unknown; use one of {list(MODES)}.")
    if mode == "auto":
        mode = "tuned" if _cpu_only() else "system"
    if mode == "system" or _applied == "tuned":
        _applied = _applied or mode
        return _applied
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        logging.getLogger(__name__).info("malloc tuning needs glibc; leaving the system allocator as is")
        _applied = "system"
        return _applied
    libc = ctypes.CDLL("libc.so.6")
    ok = all(libc.mallopt(opt, val) == 1 for opt, val in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    if not ok:
        logging.getLogger(__name__).warning("mallopt refused a setting; allocator partly tuned")
    _applied = "tuned"
    return _applied


def configure_compilation_cache(path: str | None) -> None:
    """Turns on JAX's persistent compilation cache in `path` (local or gs://; None: leave it
    off). Programs that took at least JAX's threshold (1 s) to compile are stored and later
    loaded instead of compiled, keyed by the program, the compiler options and the devices."""
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))


# <sys/mman.h>; MADV_COLLAPSE since Linux 6.1.
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_HUGE = 2 << 20


def huge_pages(tree, min_bytes: int = 4 << 20) -> dict:
    """Backs the large CPU arrays of ``tree`` with 2 MiB pages, now (best effort).

    Why: a decode step reads a few rows from each of PEER's or PKM's multi-GB tables; with 4 KiB
    pages nearly every row read is a TLB miss and a page walk, which dominates the read itself
    (docs/inference.md). For every addressable CPU shard of at least ``min_bytes``, the 2 MiB
    aligned part of its buffer is marked ``MADV_HUGEPAGE`` (so the kernel keeps it huge) and
    collapsed with ``MADV_COLLAPSE`` (synchronous; Linux ≥ 6.1 with transparent huge pages not
    ``never``). Values are untouched: the kernel copies the pages. Returns {"arrays", "bytes"
    (aligned bytes advised), "collapsed" (bytes the kernel collapsed), "errors" (errno names)};
    on other systems it does nothing."""
    out = {"arrays": 0, "bytes": 0, "collapsed": 0, "errors": []}
    if platform.system() != "Linux":
        return out
    import errno

    import jax

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    seen = set()  # a buffer that appears twice in the tree is advised once
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            data = shard.data
            if shard.device.platform != "cpu" or data.nbytes < min_bytes:
                continue
            jax.block_until_ready(data)
            ptr = data.unsafe_buffer_pointer()
            if ptr in seen:
                continue
            seen.add(ptr)
            start, end = (ptr + _HUGE - 1) & ~(_HUGE - 1), (ptr + data.nbytes) & ~(_HUGE - 1)
            if end <= start:
                continue
            out["arrays"] += 1
            out["bytes"] += end - start
            for advice in (_MADV_HUGEPAGE, _MADV_COLLAPSE):
                if libc.madvise(start, end - start, advice) != 0:
                    out["errors"].append(errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno())))
                    break
            else:
                out["collapsed"] += end - start
    return out
