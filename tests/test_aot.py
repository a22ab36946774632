"""Ahead-of-time compilation of the real train step for a TPU topology (peer_jax/aot.py,
scripts/aot_compile.py).

The compiles need `libtpu` (the `tpu` extra; marker `tpu_aot`); run them in the AOT environment:
`bash launch/setup_aot_venv.sh && .venv-tpu/bin/python -m pytest -m tpu_aot tests/test_aot.py`.
No TPU is used: the TPU devices are compile-only devices of a topology description. The checks
before any compile (flags, topology names, configuration) run everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peer_jax import aot

REPO = Path(__file__).resolve().parent.parent

tpu_aot = pytest.mark.tpu_aot
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed in this environment; create the AOT venv with "
                                         "`bash launch/setup_aot_venv.sh` and run with .venv-tpu/bin/python")

# A small model on a 2x2 v5e slice with model (and expert) axes of 2, so that tensor-parallel
# shardings and the sparse layers' shard_map paths are compiled by the TPU compiler.
TINY = ["transformer.Transformer.num_layers = 2", "transformer.Transformer.d_model = 64",
        "transformer.Transformer.num_heads = 2", "config.TrainConfig.batch_size = 8",
        "config.TrainConfig.seq_len = 64"]


def test_bad_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="GENERATION:SHAPE"):
        aot.parse_topology("tpu-v5e-256")


@pytest.mark.parametrize("topology, accelerator", [
    ("v5e:16x16", "v5litepod-256"), ("v4:4x4x4", "v4-128"), ("v5p:4x4x4", "v5p-128"), ("v6e:8x8", "v6e-64")])
def test_accelerator_type_counts_chips_or_megacore_tensorcores(topology, accelerator):
    assert aot.accelerator_type(topology) == accelerator


@pytest.mark.parametrize("binding, match", [
    ("config.TrainConfig.log_every = 0", "TrainConfig.log_every=0"),
    ("config.TrainConfig.mesh_shape = (0, 1, 1)", "TrainConfig.mesh_shape"),
    ("config.TrainConfig.sharding_rules = 'fdsp'", "TrainConfig.sharding_rules='fdsp'"),
    ("config.TrainConfig.spm_path = 'gs://bucket/spm.model'", "pass --vocab_size"),
])
def test_bad_configuration_fails_before_any_compile(binding, match):
    """Checked before libtpu is loaded: these fail the same without it."""
    extra = ["config.TrainConfig.vocabulary = 'spm'"] if "spm_path" in binding else []
    with pytest.raises(ValueError, match=match):
        aot.compile_train_step(["configs/runs/tiny_cpu.gin"], TINY + extra + [binding], "v5e:2x2")


def test_command_line_without_gin_file_is_one_line_and_status_2():
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's peer_jax, not another install's
    proc = subprocess.run([sys.executable, "scripts/aot_compile.py", "--topology=v5e:2x2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --gin_file is required")


def _check_report(r: dict) -> None:
    mem = r["memory"]
    assert mem, "memory_analysis() returned nothing"
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes", "total_bytes"):
        assert mem[key] > 0, (key, mem)
    assert r["fits"] is True
    assert 0 < r["hbm_fraction"] < 1
    assert r["cost_per_device"]["flops"] > 0 and r["cost_per_device"]["bytes_accessed"] > 0
    if r["model"]["scan_layers"]:  # cost analysis counts a scan body once: no bounds from it
        assert "estimate" not in r and "scan_layers" in r["estimate_caveat"]
        return
    est = r["estimate"]
    assert 0 < est["mfu_at_roofline"] <= est["mfu_at_compute_bound"]
    assert est["step_time_roofline_s"] >= est["step_time_compute_bound_s"] > 0


@tpu_aot
@needs_libtpu
def test_tiny_dense_compiles_for_v5e_2x2():
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
@tpu_aot
@needs_libtpu
def test_tiny_sparse_models_compile_for_v5e_2x2(model_gin, mesh_shape):
    gin_file = f"configs/models/{model_gin}.gin"
    if not (REPO / gin_file).exists():
        pytest.skip(f"{gin_file} does not exist yet")
    r = aot.compile_train_step(["configs/base.gin", gin_file], TINY, "v5e:2x2", mesh_shape=mesh_shape)
    assert tuple(r["mesh"].values()) == mesh_shape
    _check_report(r)


@tpu_aot
@needs_libtpu
def test_out_of_memory_is_reported_not_raised():
    # A 2M-token vocabulary at d_model 1024: embeddings alone are 16 GB in float32 per device.
    r = aot.compile_train_step(["configs/runs/tiny_cpu.gin"], TINY + ["transformer.Transformer.d_model = 1024"],
                               "v5e:2x2", mesh_shape=(4, 1, 1), vocab_size=2_000_000)
    assert r["fits"] is False
    assert "RESOURCE_EXHAUSTED" in r["error"] or "memory" in r["error"]
    assert "DOES NOT FIT" in aot.format_report(r)


# Attention at a splash-sized sequence (a multiple of 128): the kernel must be in the program.
SPLASH = [b.replace("seq_len = 64", "seq_len = 256") for b in TINY]


@tpu_aot
@needs_libtpu
def test_splash_attention_is_compiled_into_the_program():
    r = aot.compile_train_step(["configs/runs/tiny_cpu.gin"], SPLASH, "v5e:2x2", mesh_shape=(2, 1, 2))
    _check_report(r)
    assert r["attention_impl"] == "splash"
    kernels = r["pallas_kernels"]
    assert any(k.startswith("splash_mha_fwd") for k in kernels), kernels
    assert any("dkv" in k for k in kernels) and any("dq" in k for k in kernels), kernels  # the backward too
    xla = aot.compile_train_step(["configs/runs/tiny_cpu.gin"], SPLASH + ['transformer.Transformer.attention_impl = "xla"'],
                                 "v5e:2x2", mesh_shape=(2, 1, 2))
    assert xla["attention_impl"] == "xla" and xla["pallas_kernels"] == []


@tpu_aot
@needs_libtpu
def test_scanned_layers_compile_and_count_their_collectives_per_layer():
    scanned = SPLASH + ["transformer.Transformer.num_layers = 4", "transformer.Transformer.scan_layers = True"]
    r = aot.compile_train_step(["configs/runs/tiny_cpu.gin"], scanned, "v5e:2x2", mesh_shape=(2, 1, 2))
    _check_report(r)
    assert r["model"]["scan_layers"] is True
    coll = r["collectives"]
    assert coll["unknown_trip_count_loops"] == []  # every loop's trip count was read or inferred
    unscanned = aot.compile_train_step(["configs/runs/tiny_cpu.gin"], scanned[:-1], "v5e:2x2", mesh_shape=(2, 1, 2))
    # Tensor parallelism all-reduces per layer: in the scan the same traffic comes from a loop
    # body counted once per layer, so the per-step totals agree within the compilers' freedom
    # to combine or move collectives.
    ratio = coll["total_bytes"] / unscanned["collectives"]["total_bytes"]
    assert 0.75 < ratio < 1.33, (coll, unscanned["collectives"])


@tpu_aot
@needs_libtpu
def test_expert_tables_over_data_all_gather_rows_and_reduce_scatter_grads():
    files = ["configs/base.gin", "configs/models/peer_tiny.gin"]
    default = aot.compile_train_step(files, SPLASH, "v5e:2x2", mesh_shape=(2, 1, 2))
    fsdp = aot.compile_train_step(files, SPLASH, "v5e:2x2", mesh_shape=(2, 1, 2), rules="fsdp_expert_tables")
    for r in (default, fsdp):
        _check_report(r)
    table = 128**2 * 64 * 4 // 2  # one of u / v: N = 128² rows x d_model 64, float32, d split over model = 2
    g_default, g_fsdp = default["collectives"]["by_kind"], fsdp["collectives"]["by_kind"]
    # Rows over data: each device gathers the other half of both tables' rows (forward) and
    # reduce-scatters both tables' gradients (backward), instead of all-reducing replicas.
    assert g_fsdp["all-gather"]["bytes"] - g_default["all-gather"]["bytes"] >= 2 * table
    assert g_fsdp["reduce-scatter"]["bytes"] >= 2 * table > g_default["reduce-scatter"]["bytes"]
    state = lambda r: sum(r["state_bytes_per_device"].values())  # noqa: E731
    assert state(fsdp) <= state(default) - 3 * 2 * table / 2  # tables and both Adam moments halved


@tpu_aot
@needs_libtpu
@pytest.mark.parametrize("layer,tables", [("peer", 2), ("pkm", 1)])
def test_memory_parallel_moves_tokens_not_tables(layer, tables):
    """`memory_parallel` on a v5e 2x2 as (data 1, expert 2, model 2): the tables stay split over
    the 4-device group, so no table gradient is summed anywhere, and the lookup's traffic is the
    group's routing and activations (all-gather, all-to-all), as `peer_jax.comm_model` counts it.
    The d-split of the default rules on (data 2, model 2) all-reduces the tables' gradients over
    the two data replicas instead."""
    from peer_jax import comm_model

    files = ["configs/base.gin", f"configs/models/{layer}_tiny.gin"]
    split = aot.compile_train_step(files, TINY, "v5e:2x2", mesh_shape=(2, 1, 2))
    mp = aot.compile_train_step(files, TINY, "v5e:2x2", mesh_shape=(1, 2, 2), rules="memory_parallel")
    for r in (split, mp):
        _check_report(r)
    table = 128**2 * 64 * 4 // 2  # one table's gradient per device: N = 128² × d 64 float32, d over model = 2
    g_split, g_mp = split["collectives"]["by_kind"], mp["collectives"]["by_kind"]
    assert g_split["all-reduce"]["bytes"] >= tables * table > g_mp["all-reduce"]["bytes"]
    assert g_mp["all-to-all"]["count"] > 0 == g_split["all-to-all"]["count"]
    model = comm_model.lookup_bytes(tokens=8 * 64, slots=4 * 8 if layer == "peer" else 4 * 16, d=64, rows=128**2,
                                    tables=tables, data=1, expert=2, model=2, act_bytes=4)
    assert model.table_grad_all_reduce == 0
    # The routing all-gather of the model is in the compiled program (other layers gather nothing here).
    assert g_mp["all-gather"]["bytes"] >= model.routing_all_gather
    state = lambda r: sum(r["state_bytes_per_device"].values())  # noqa: E731
    assert state(mp) <= state(split) - 3 * tables * table / 2  # tables and both Adam moments over 4, not 2


@tpu_aot
@needs_libtpu
def test_sparsecore_gather_offload_is_reported():
    files = ["configs/base.gin", "configs/models/peer_tiny.gin"]
    off = aot.compile_train_step(files, TINY, "v5p:2x2x1", mesh_shape=(2, 1, 2))
    on = aot.compile_train_step(files, TINY, "v5p:2x2x1", mesh_shape=(2, 1, 2),
                                compiler_options={"xla_tpu_offload_gather_to_sparsecore": True})
    gathers = lambda r: [o for o in r["sparsecore_offloads"] if o.endswith("/gather")]  # noqa: E731
    # v5p offloads the table gradients' scatter-adds by default; the option adds gathers.
    assert any("scatter" in o for o in off["sparsecore_offloads"]) and gathers(off) == []
    assert gathers(on), on["sparsecore_offloads"]
    assert on["compiler_options"] == {"xla_tpu_offload_gather_to_sparsecore": True}


@tpu_aot
@needs_libtpu
def test_a_model_axis_of_two_on_a_slice_with_physical_axes_of_four():
    # v5p 4x4x4: 2 is no product of whole physical axes, so jax.make_mesh refuses it and
    # sharding.physical_mesh splits a physical axis. The paper grid's (-1, 1, 2) needs this.
    r = aot.compile_train_step(["configs/runs/tiny_cpu.gin"], TINY + ["config.TrainConfig.batch_size = 32"],
                               "v5p:4x4x4", mesh_shape=(-1, 1, 2))
    assert r["mesh"] == {"data": 32, "expert": 1, "model": 2}
    _check_report(r)
