"""peer_jax.runtime: the allocator settings the command-line entry points apply on CPU."""

import subprocess
import sys
import textwrap

import pytest

from peer_jax import runtime

FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    from peer_jax import runtime
    applied = runtime.configure_malloc(sys.argv[1])
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2**20
    def touch_and_free():  # what a step does with a fresh output buffer
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    touch_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        touch_and_free()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6)
""")


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, float(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt")
def test_tuned_allocator_reuses_large_blocks_instead_of_faulting_them_in():
    """A fresh 64 MiB buffer faults in all its 16,384 pages under glibc's defaults (mmap per
    allocation); tuned, the freed block is reused and (almost) nothing faults."""
    assert _faults("system") == ("system", pytest.approx(16384, rel=0.05))
    applied, faults = _faults("tuned")
    assert applied == "tuned" and faults < 100


def test_auto_tunes_only_cpu_runs(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert runtime.configure_malloc("auto") == "system"
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert runtime._cpu_only()


def test_unknown_mode_names_the_setting(monkeypatch):
    monkeypatch.setenv("PEER_JAX_MALLOC", "fast")
    with pytest.raises(ValueError, match="PEER_JAX_MALLOC='fast' is unknown"):
        runtime.configure_malloc()


HUGE = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from peer_jax import runtime
    x = jnp.asarray(np.arange(8 * 2**20, dtype=np.float32).reshape(2**13, 2**10))  # 32 MiB
    small = jnp.ones((4, 4))
    def huge_kb(lo, hi):  # AnonHugePages of the mappings overlapping [lo, hi)
        total, inside = 0, False
        for line in open("/proc/self/smaps"):
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(v, 16) for v in head.split("-"))
                inside = a < hi and b > lo
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
        return total
    report = runtime.huge_pages({"table": x, "again": x, "small": small}, min_bytes=1 << 20)
    same = bool(jnp.array_equal(x, jnp.arange(8 * 2**20, dtype=jnp.float32).reshape(2**13, 2**10)))
    ptr = x.unsafe_buffer_pointer()
    print(json.dumps({**report, "huge_kb": huge_kb(ptr, ptr + x.nbytes), "same": same}))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="madvise")
def test_huge_pages_collapses_large_arrays_and_keeps_their_values():
    """The table's aligned 2 MiB pages are advised once (the 64-byte array not) and its values are
    unchanged; where the kernel reports the collapse done, the mappings holding the table are
    backed by at least that many KiB of huge pages (a kernel without MADV_COLLAPSE or with THP
    off reports the errno instead)."""
    import json

    out = subprocess.run([sys.executable, "-c", HUGE], capture_output=True, text=True, check=True).stdout
    r = json.loads(out.splitlines()[-1])
    assert r["same"] and r["arrays"] == 1 and 30 << 20 <= r["bytes"] <= 32 << 20
    if r["errors"]:
        assert r["collapsed"] == 0 and r["errors"][0] in ("EINVAL", "EAGAIN", "ENOMEM", "EPERM"), r
    else:
        assert r["collapsed"] == r["bytes"] and r["huge_kb"] >= r["bytes"] // 1024, r
