"""Peak FLOP/s by device kind (peer_jax/hardware.py) and the step-range profiler."""

import types

import jax
import jax.numpy as jnp
import pytest

from peer_jax import hardware
from peer_jax.training.profiling import StepProfiler


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("Tesla T4", None),
])
def test_peak_by_device_kind(kind, peak):
    assert hardware.peak_flops(kind) == peak


def test_no_peak_on_cpu_or_mixed_devices():
    assert hardware.peak_flops_per_device() is None  # the tests run on CPU
    tpu = lambda kind: types.SimpleNamespace(platform="tpu", device_kind=kind)  # noqa: E731
    assert hardware.peak_flops_per_device([tpu("TPU v4")] * 4) == 275e12
    assert hardware.peak_flops_per_device([tpu("TPU v4"), tpu("TPU v5 lite")]) is None


def test_profiler_traces_the_step_range(tmp_path):
    f = jax.jit(lambda x: x * 2)
    prof = StepProfiler((2, 3), tmp_path, start_step=0, num_steps=5)
    x = jnp.ones(4)
    for step in range(1, 6):
        x = f(x)
        prof.after_step(step, x)
        assert prof.active == (step in (1, 2))  # traced: steps 2 and 3
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_profiler_off_is_a_no_op(tmp_path):
    # Bad ranges are refused before anything compiles (training.build.validate, tests/test_build.py).
    prof = StepProfiler(None, tmp_path, start_step=0, num_steps=5)
    prof.after_step(1)
    assert not prof.active and not (tmp_path / "profile").exists()
