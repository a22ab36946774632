"""Compile the real train step for a TPU slice from a CPU host, and report memory and FLOPs.

The library behind `scripts/aot_compile.py` (its docstring has the command line; the report's
fields are described there too). Nothing is allocated and no TPU is touched: the TPU devices
are *compile-only* devices of a topology description made by `libtpu`
(`jax.experimental.topologies.get_topology_desc`), and the train state and step are the
trainer's own, from `training.build.build` (abstract state: ShapeDtypeStructs carrying their
shardings), lowered and compiled by the TPU compiler. JAX itself must run on the CPU backend:
`JAX_PLATFORMS=cpu` set before jax is imported (the script does it; so does the test
session's conftest). Needs `libtpu` (the project's `tpu` extra; `.venv-tpu`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float  # per device (chip; v4/v5p in megacore mode)
    peak_bf16_flops: float  # per device, dense bf16 matmul peak
    hbm_bytes_per_s: float
    accelerator: str  # gcloud accelerator-type prefix: <prefix>-<TensorCores or chips>
    chip_config: str = "default"


# Google Cloud TPU documentation (system architecture pages of each generation).
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, "v4", chip_config="megacore"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, "v5litepod"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, "v5p"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1600e9, "v6e"),
}


# gcloud names v4 and v5p slices by TensorCores (two per chip), the others by chips.
TENSORCORES_PER_CHIP = {"v4": 2, "v5p": 2}


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def parse_topology(topology: str) -> tuple[Chip, str]:
    gen, sep, shape = topology.partition(":")
    if not sep or gen not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise ValueError(f"--topology={topology!r}: write GENERATION:SHAPE with GENERATION one of {sorted(CHIPS)}, "
                         "e.g. v5e:16x16 (v5litepod-256), v4:4x4x4 (v4-128), v5p:4x4x4 (v5p-128), v6e:8x8.")
    return CHIPS[gen], topology


def accelerator_type(topology: str) -> str:
    """gcloud's accelerator type of a topology: v5litepod-256 for v5e:16x16, v5p-128 for
    v5p:4x4x4 (v4 and v5p count TensorCores, two per chip)."""
    chip, name = parse_topology(topology)
    chips = 1
    for s in name.partition(":")[2].split("x"):
        chips *= int(s)
    return f"{chip.accelerator}-{chips * TENSORCORES_PER_CHIP.get(chip.name, 1)}"


def topology_devices(topology: str, chip_config: str | None = None):
    """Compile-only TPU devices of a topology (one per chip; v4 and v5p in megacore mode)."""
    from jax.experimental import topologies

    chip, name = parse_topology(topology)
    # libtpu reads these once, when it starts (here: get_topology_desc loads it).
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"  # no GCE metadata-server queries
    # Compile-only use touches no chip, so concurrent compiles need not take libtpu's host lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # libtpu looks for the TPU VM it runs on (worker host names, accelerator type) and, finding
    # none, prints start-up errors that do not affect a compile-only topology. Naming this host
    # as the only worker and the topology's accelerator type silences them.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
    return topologies.get_topology_desc(name, "tpu", chip_config_name=chip_config or chip.chip_config).devices


def build_mesh(devices, mesh_shape):
    """The (data, expert, model) mesh the trainer builds on a pod, over the given devices.

    Same construction as `peer_jax.sharding.make_mesh` when the devices are `jax.devices()`
    (`sharding.physical_mesh`: the axes laid out along the physical torus), with explicit
    Auto axis types.
    """
    from jax.sharding import AxisType

    from peer_jax import sharding

    shape = sharding.resolve_mesh_shape(mesh_shape, len(devices))
    return sharding.physical_mesh(shape, devices, AxisType.Auto)


def _check_vocabulary(cfg, vocab_size: int | None) -> None:
    spm = cfg.spm_path or ""
    if vocab_size is None and cfg.vocabulary == "spm" and "://" in spm:
        raise ValueError(f"TrainConfig.spm_path={spm!r} is remote and is not read here: pass --vocab_size "
                         "(the tokenizer's size, e.g. 32000 for T5's C4 SentencePiece model).")


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes", "host_temp_size_in_bytes")
    out = {k: int(getattr(mem, k, 0) or 0) for k in keys}
    # Donated arguments alias outputs: count those bytes once.
    out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                          + out["temp_size_in_bytes"] + out["generated_code_size_in_bytes"])
    return out


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0))}


def program_contents(hlo_text: str) -> dict:
    """What the compiled program holds besides plain XLA ops: collective bytes per device
    (`peer_jax.hlo_stats`), the Pallas kernels (TPU custom calls, by instruction name, e.g.
    splash_mha_fwd...) and the computations offloaded to SparseCore (async calls on the
    'sparsecore' thread, by the JAX op that produced them)."""
    from peer_jax import hlo_stats

    kernels, offloads = set(), []
    for line in hlo_text.splitlines():
        name = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if name and 'custom_call_target="tpu_custom_call"' in line:
            kernels.add(re.sub(r"(\.\d+)+$", "", name.group(1)))
        if name and " call-start(" in line and 'async_execution_thread="sparsecore"' in line:
            op = re.search(r'op_name="([^"]*)"', line)
            offloads.append(op.group(1) if op else name.group(1))
    return {"collectives": hlo_stats.collective_bytes(hlo_text), "pallas_kernels": sorted(kernels),
            "sparsecore_offloads": sorted(offloads)}


def _is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


def _state_bytes(state) -> dict[str, int]:
    import jax
    import numpy as np

    return {k: int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(v)))
            for k, v in state.items()}


def _attention_impl(impl: str, seq_len: int, mesh) -> str:
    import jax

    from peer_jax.backends import attention

    with jax.set_mesh(mesh):
        return attention.resolve(impl, seq_len)


def _lower_and_compile(cfg, chip: Chip, topology: str, vocab_size, chip_config, compiler_options=None):
    """(report, compiled, or None when the TPU compiler ran out of HBM) for a parsed TrainConfig."""
    import numpy as np

    from peer_jax import flops as flops_lib
    from peer_jax.training import build as build_lib

    build_lib.validate(cfg)
    _check_vocabulary(cfg, vocab_size)
    t0 = time.perf_counter()
    devices = topology_devices(topology, chip_config)
    mesh = build_mesh(devices, cfg.mesh_shape)
    built = build_lib.build(cfg, mesh, vocab_size=vocab_size)
    micro = built.micro_batch
    model = built.abstract_model()
    count = flops_lib.count(model, cfg.seq_len, micro)
    tokens = cfg.batch_size * cfg.seq_len
    shape = ",".join(str(s) for s in mesh.shape.values())
    report = {
        "topology": topology, "chip": chip.name, "device_kind": devices[0].device_kind,
        "num_devices": len(devices), "num_hosts": len({d.process_index for d in devices}),
        "mesh": dict(mesh.shape), "rules": cfg.sharding_rules,
        "train_bindings": [f"--gin.config.TrainConfig.mesh_shape=({shape})",
                           f"--gin.config.TrainConfig.sharding_rules='\"{cfg.sharding_rules}\"'"],
        "model": {"num_layers": model.num_layers, "d_model": model.d_model, "num_heads": model.num_heads,
                  "vocab_size": built.model_vocab, "dtype": str(np.dtype(model.dtype)),
                  "ffw": [type(f).__name__ for f, n in model.ffw_layers() for _ in range(n)],
                  "scan_layers": model.scan_layers, "remat": model.remat},
        # What Attention(impl=...) resolves to when compiled for this topology ('splash' on TPU).
        "attention_impl": _attention_impl(model.attention_impl, cfg.seq_len, mesh),
        "model_flops_per_step_maxtext": flops_lib.maxtext_train_flops_per_token(model, cfg.seq_len, micro) * tokens,
        "params": flops_lib.param_counts(model, cfg.seq_len, micro),
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "grad_accum_steps": cfg.grad_accum_steps,
        "tokens_per_step": tokens, "model_flops_per_step": count.train * tokens,
        "chip_spec": dataclasses.asdict(chip),
        "state_bytes_per_device": _state_bytes(built.abstract_state),
    }
    del model
    t2 = t3 = time.perf_counter()
    try:
        with built.context():
            lowered = built.train_step.lower(built.abstract_state, built.abstract_batch())
            t3 = time.perf_counter()
            compiled = lowered.compile(compiler_options=compiler_options or None)
    except Exception as e:  # noqa: BLE001 - the TPU compiler's out-of-memory is a JaxRuntimeError
        if not _is_oom(e):
            raise
        report.update(fits=False, failed_stage="train step", error=str(e)[:4000], setup_s=t2 - t0,
                      lower_s=t3 - t2, compile_s=time.perf_counter() - t3)
        return report, None
    report.update(setup_s=t2 - t0, lower_s=t3 - t2, compile_s=time.perf_counter() - t3)
    return report, compiled


def compile_train_step(gin_files: list[str], bindings: list[str], topology: str, *, mesh_shape=None,
                       rules: str | None = None, vocab_size: int | None = None,
                       chip_config: str | None = None, compiler_options: dict | None = None,
                       hlo_out: str | None = None) -> dict:
    """Builds the gin-configured train step for `topology`, compiles it and returns the report."""
    import gin
    import jax

    from peer_jax import gin_utils
    from peer_jax.training.config import TrainConfig

    if jax.default_backend() != "cpu":
        raise RuntimeError(f"JAX's default backend is {jax.default_backend()!r}; this script must run with "
                           "JAX_PLATFORMS=cpu (set before jax is imported) so that no real TPU is used.")
    chip, topology = parse_topology(topology)
    gin_utils.parse(gin_files, bindings)
    try:
        cfg = gin.get_configurable(TrainConfig)()
        overrides = {"mesh_shape": None if mesh_shape is None else tuple(mesh_shape), "sharding_rules": rules}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        report, compiled = _lower_and_compile(cfg, chip, topology, vocab_size, chip_config, compiler_options)
    finally:
        gin.clear_config()
    report = {"gin_files": list(gin_files), "gin_bindings": list(bindings),
              "compiler_options": dict(compiler_options or {}), **report}
    if compiled is None:
        return report
    hlo_text = compiled.as_text()
    report.update(program_contents(hlo_text))
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(hlo_text)
    n, tokens = report["num_devices"], report["tokens_per_step"]
    mem, cost = _memory(compiled), _cost(compiled)
    report["memory"] = mem
    if mem:
        # The larger of the buffer sum and the compiler's reported peak decides the fit.
        need = max(mem["total_bytes"], mem["peak_memory_in_bytes"])
        report["fits"], report["hbm_fraction"] = need <= chip.hbm_bytes, need / chip.hbm_bytes
    else:
        report["fits"], report["hbm_fraction"] = None, None  # compiled, but no memory analysis
    report["cost_per_device"] = cost
    if report["model"]["scan_layers"]:
        # XLA's cost analysis counts a while body once: FLOPs and bytes of a scanned stack
        # cover one layer of it, so bounds from them would be too low by about the depth.
        report["estimate_caveat"] = ("scan_layers: XLA's cost analysis counts each scanned stack's body once; "
                                     "compile with --gin.transformer.Transformer.scan_layers=False for FLOPs, "
                                     "bytes and bounds of the whole step")
    if cost["flops"] > 0 and not report["model"]["scan_layers"]:
        t_compute = cost["flops"] / chip.peak_bf16_flops
        t_hbm = cost["bytes_accessed"] / chip.hbm_bytes_per_s
        t_roof = max(t_compute, t_hbm)
        report["estimate"] = {
            "xla_flops_per_step_all_devices": cost["flops"] * n,
            "model_over_xla_flops": report["model_flops_per_step"] / (cost["flops"] * n),
            "step_time_compute_bound_s": t_compute,
            "step_time_hbm_bound_s": t_hbm,
            "step_time_roofline_s": t_roof,
            "mfu_at_compute_bound": report["model_flops_per_step"] / (n * chip.peak_bf16_flops * t_compute),
            "mfu_at_roofline": report["model_flops_per_step"] / (n * chip.peak_bf16_flops * t_roof),
            "tokens_per_s_at_roofline": tokens / t_roof,
        }
    return report


def _fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
    model, hbm = r["model"], r["chip_spec"]["hbm_bytes"]
    lines = [
        f"topology {r['topology']} ({r['num_devices']} x {r['device_kind']}, {r['num_hosts']} hosts), "
        f"mesh {r['mesh']}, rules {r['rules']!r}",
        f"model L{model['num_layers']} d{model['d_model']} h{model['num_heads']} vocab {model['vocab_size']} "
        f"dtype {model['dtype']}; params {r['params']['total']:.4g} (non-embedding "
        f"{r['params']['non_embedding']:.4g}); batch {r['batch_size']} x {r['seq_len']} "
        f"(grad_accum {r['grad_accum_steps']})",
    ]
    if r.get("state_bytes_per_device"):
        lines.append("train state per device: " + ", ".join(
            f"{k} {_fmt_bytes(v)}" for k, v in r["state_bytes_per_device"].items() if v > 2**20))
    lines.append(f"set-up {r['setup_s']:.1f} s, lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s")
    if r.get("error"):
        lines.append(f"DOES NOT FIT: the TPU compiler ran out of memory compiling the {r['failed_stage']} "
                     f"({_fmt_bytes(hbm)} HBM per device):")
        lines.append("  " + r["error"].strip().splitlines()[0][:400])
        return "\n".join(lines)
    m = r["memory"]
    if not m:
        lines.append("compiled, but the compiler returned no memory analysis")
    else:
        lines += [
            "memory per device (compiled.memory_analysis()):",
            f"  arguments       {_fmt_bytes(m['argument_size_in_bytes'])}",
            f"  outputs         {_fmt_bytes(m['output_size_in_bytes'])} (aliased with donated arguments: "
            f"{_fmt_bytes(m['alias_size_in_bytes'])})",
            f"  temporaries     {_fmt_bytes(m['temp_size_in_bytes'])}",
            f"  generated code  {_fmt_bytes(m['generated_code_size_in_bytes'])}",
            f"  total           {_fmt_bytes(m['total_bytes'])} (arguments + outputs - aliased + temporaries + code)",
            f"  compiler peak   {_fmt_bytes(m['peak_memory_in_bytes'])}",
            f"  -> {100 * r['hbm_fraction']:.1f} % of {_fmt_bytes(hbm)} HBM: "
            f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
        ]
    c, e = r["cost_per_device"], r.get("estimate")
    lines.append(f"XLA cost analysis per device per step: {c['flops']:.4g} FLOPs, "
                 f"{c['bytes_accessed']:.4g} bytes accessed")
    if r.get("estimate_caveat"):
        lines.append(f"  ({r['estimate_caveat']})")
    lines.append(f"model FLOPs per step (peer_jax.flops, all devices): {r['model_flops_per_step']:.4g}")
    coll = r.get("collectives")
    if coll:
        kinds = ", ".join(f"{k} {_fmt_bytes(v['bytes'])} ({v['count']} ops)" for k, v in coll["by_kind"].items()
                          if v["count"])
        lines.append(f"collectives per device per step (from the compiled HLO): {_fmt_bytes(coll['total_bytes'])}"
                     + (f": {kinds}" if kinds else ""))
        if coll["unknown_trip_count_loops"]:
            lines.append(f"  (loops without a known trip count, counted once: {coll['unknown_trip_count_loops']})")
    lines.append(f"attention: {r['attention_impl']}; Pallas kernels in the program: "
                 f"{', '.join(r.get('pallas_kernels') or []) or 'none'}")
    if r.get("compiler_options"):
        offloads = r.get("sparsecore_offloads") or []
        lines.append(f"compiler options {r['compiler_options']}; SparseCore offloads: {len(offloads)}"
                     + (f" ({', '.join(sorted(set(offloads)))})" if offloads else ""))
    if e:
        lines += [
            f"XLA FLOPs per step, all devices: {e['xla_flops_per_step_all_devices']:.4g} "
            f"(model/XLA = {e['model_over_xla_flops']:.3f})",
            "estimates - lower bounds on step time, upper bounds on MFU (no communication, no overheads):",
            f"  compute-bound at peak bf16 {r['chip_spec']['peak_bf16_flops']:.3g} FLOP/s: "
            f"{1e3 * e['step_time_compute_bound_s']:.1f} ms/step, MFU <= {100 * e['mfu_at_compute_bound']:.1f} %",
            f"  HBM-bound at {r['chip_spec']['hbm_bytes_per_s']:.3g} B/s: "
            f"{1e3 * e['step_time_hbm_bound_s']:.1f} ms/step",
            f"  roofline max(compute, HBM): {1e3 * e['step_time_roofline_s']:.1f} ms/step, "
            f"MFU <= {100 * e['mfu_at_roofline']:.1f} %, <= {e['tokens_per_s_at_roofline']:.4g} tokens/s",
        ]
    lines.append("train with: " + " ".join(r["train_bindings"]))
    return "\n".join(lines)


