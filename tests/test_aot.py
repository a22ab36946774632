"""Ahead-of-time compilation of the real train step for a TPU topology (scripts/aot_compile.py).

Needs `libtpu` (the `tpu` extra); run in the AOT environment:
`bash launch/setup_aot_venv.sh && .venv-tpu/bin/python -m pytest -m tpu_aot tests/test_aot.py`.
No TPU is used: the TPU devices are compile-only devices of a topology description.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu is not installed in this environment; create the AOT venv with "
                              "`bash launch/setup_aot_venv.sh` and run with .venv-tpu/bin/python"),
]

# A small model on a 2x2 v5e slice with model (and expert) axes of 2, so that tensor-parallel
# shardings and the sparse layers' shard_map paths are compiled by the TPU compiler.
TINY = ["transformer.Transformer.num_layers = 2", "transformer.Transformer.d_model = 64",
        "transformer.Transformer.num_heads = 2", "config.TrainConfig.batch_size = 8",
        "config.TrainConfig.seq_len = 64"]


@pytest.fixture(scope="module")
def aot():
    spec = importlib.util.spec_from_file_location("aot_compile", REPO / "scripts" / "aot_compile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _check_report(r: dict) -> None:
    mem = r["memory"]
    assert mem, "memory_analysis() returned nothing"
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes", "total_bytes"):
        assert mem[key] > 0, (key, mem)
    assert r["fits"] is True
    assert 0 < r["hbm_fraction"] < 1
    assert r["cost_per_device"]["flops"] > 0 and r["cost_per_device"]["bytes_accessed"] > 0
    est = r["estimate"]
    assert 0 < est["mfu_at_roofline"] <= est["mfu_at_compute_bound"]
    assert est["step_time_roofline_s"] >= est["step_time_compute_bound_s"] > 0


def test_tiny_dense_compiles_for_v5e_2x2(aot):
    r = aot.compile_train_step(["configs/runs/tiny_cpu.gin"], TINY, "v5e:2x2", mesh_shape=(2, 1, 2))
    assert r["num_devices"] == 4 and r["device_kind"].startswith("TPU v5")
    assert r["mesh"] == {"data": 2, "expert": 1, "model": 2}
    _check_report(r)
    # Cost analysis is per device: the four devices together do about the model's FLOPs
    # (XLA also counts elementwise work; peer_jax.flops does not).
    assert 0.8 < r["estimate"]["model_over_xla_flops"] <= 1.0


@pytest.mark.parametrize("model_gin, mesh_shape", [
    ("moe_tiny", (2, 1, 2)),
    ("moe_tiny", (1, 2, 2)),  # expert parallel
    ("peer_tiny", (1, 2, 2)),
    ("pkm_tiny", (1, 2, 2)),
])
def test_tiny_sparse_models_compile_for_v5e_2x2(aot, model_gin, mesh_shape):
    gin_file = f"configs/models/{model_gin}.gin"
    if not (REPO / gin_file).exists():
        pytest.skip(f"{gin_file} does not exist yet")
    r = aot.compile_train_step(["configs/base.gin", gin_file], TINY, "v5e:2x2", mesh_shape=mesh_shape)
    assert tuple(r["mesh"].values()) == mesh_shape
    _check_report(r)


def test_out_of_memory_is_reported_not_raised(aot):
    # A 2M-token vocabulary at d_model 1024: embeddings alone are 16 GB in float32 per device.
    r = aot.compile_train_step(["configs/runs/tiny_cpu.gin"], TINY + ["transformer.Transformer.d_model = 1024"],
                               "v5e:2x2", mesh_shape=(4, 1, 1), vocab_size=2_000_000)
    assert r["fits"] is False
    assert "RESOURCE_EXHAUSTED" in r["error"] or "memory" in r["error"]
    assert "DOES NOT FIT" in aot.format_report(r)


def test_bad_topology_is_a_clear_error(aot):
    with pytest.raises(ValueError, match="GENERATION:SHAPE"):
        aot.parse_topology("tpu-v5e-256")
