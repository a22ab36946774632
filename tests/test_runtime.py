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
