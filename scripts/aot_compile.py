"""Compile the real train step for a TPU slice from a CPU host and report memory and FLOPs.

    .venv-tpu/bin/python scripts/aot_compile.py --gin_file=configs/isoflop/paper/<point>.gin \\
        --topology=v5e:16x16 [--mesh_shape=-1,1,1] [--rules=default|fsdp|data_parallel] \\
        [--vocab_size=32000] [--gin.NAME=VALUE ...] [--json out.json]

Nothing is allocated and no TPU is touched: the TPU devices are *compile-only* devices of a
topology description made by `libtpu` (`jax.experimental.topologies.get_topology_desc`), the
train state is `step.abstract_train_state` (ShapeDtypeStructs carrying their shardings) and
the step is the trainer's own `make_train_step` + `jit_train_step`, lowered and compiled by
the TPU compiler. JAX itself runs on the CPU backend (`JAX_PLATFORMS=cpu` is forced below).

Printed (and written to --json): per-device memory from `compiled.memory_analysis()`
(arguments, outputs, aliased, temporaries, generated code, total) against the chip's HBM;
XLA's cost-analysis FLOPs and bytes accessed per device per step; the model FLOPs per step
of `peer_jax.flops`; and *optimistic* timing bounds:

* compute bound: XLA FLOPs per device / the chip's peak bf16 FLOP/s — a lower bound on the
  step time that assumes every FLOP runs on the MXU at peak;
* roofline bound: max(compute bound, bytes accessed per device / HBM bandwidth);
* MFU at either bound: model FLOPs per step / (devices · peak · bound), i.e. an *upper*
  bound on MFU. Communication (ICI/DCN collectives), gaps between ops and the host input
  pipeline are ignored, and "bytes accessed" is XLA's static per-op estimate (fusion operands
  counted whole; a while/scan body counted once), so the HBM term is indicative, not exact.

A program that does not fit in HBM fails to compile with RESOURCE_EXHAUSTED; that is
reported with the compiler's message. Exit status: 0 fits, 1 does not fit, 2 bad arguments
or configuration. Needs `libtpu` (the project's `tpu` extra): run it with `.venv-tpu/bin/python`
(`bash launch/setup_aot_venv.sh` creates it; see launch/README.md and docs/pod_scale.md).
"""

from __future__ import annotations

import os
import sys

# Never a real TPU backend: JAX runs on CPU, the TPU exists only as a topology description.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["TPU_SKIP_MDS_QUERY"] = "1"  # no GCE metadata-server queries from libtpu
# Compile-only use touches no chip, so concurrent compiles need not take libtpu's host lock.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu looks for the TPU VM it runs on (worker host names, accelerator type) and, finding
# none, prints three start-up errors that do not affect a compile-only topology. Naming this
# host as the only worker silences them; `topology_devices` sets the accelerator type.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

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
    return f"{chip.accelerator}-{chips * (2 if chip.chip_config == 'megacore' else 1)}"


def topology_devices(topology: str, chip_config: str | None = None):
    """Compile-only TPU devices of a topology (one per chip; v4 and v5p in megacore mode)."""
    from jax.experimental import topologies

    chip, name = parse_topology(topology)
    # Read once, when libtpu starts: only its start-up messages depend on it (module top).
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


def model_vocab_size(cfg, vocab_size: int | None) -> int:
    """The trainer's model vocabulary: the tokenizer's size rounded up to `vocab_multiple`."""
    if vocab_size is None:
        spm = cfg.spm_path or ""
        if cfg.vocabulary == "spm" and "://" in spm:
            raise ValueError(f"TrainConfig.spm_path={spm!r} is remote and is not read here: pass --vocab_size "
                             "(the tokenizer's size, e.g. 32000 for T5's C4 SentencePiece model).")
        from peer_jax.data import vocab as vocab_lib

        vocab_size = vocab_lib.vocabulary(cfg.vocabulary, cfg.spm_path).vocab_size
    return -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple


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


def _lower_and_compile(cfg, chip: Chip, topology: str, mesh_shape, rules, vocab_size, chip_config,
                       compiler_options=None):
    """(report, compiled, or None when the TPU compiler ran out of HBM) for a parsed TrainConfig."""
    import jax
    import numpy as np
    from flax import nnx

    from peer_jax import flops as flops_lib
    from peer_jax import sharding
    from peer_jax.training import loop
    from peer_jax.training import step as step_lib

    mesh_shape = tuple(cfg.mesh_shape if mesh_shape is None else mesh_shape)
    rules_name = cfg.sharding_rules if rules is None else rules
    rule_table = sharding.get_rules(rules_name)
    vocab = model_vocab_size(cfg, vocab_size)

    t0 = time.perf_counter()
    devices = topology_devices(topology, chip_config)
    mesh = build_mesh(devices, mesh_shape)
    micro = loop.check_batch(cfg, mesh, rule_table)
    tx, _ = cfg.optimizer(cfg.num_steps)
    model = nnx.eval_shape(lambda: cfg.model(vocab, rngs=nnx.Rngs(0)))
    count = flops_lib.count(model, cfg.seq_len, micro)
    tokens = cfg.batch_size * cfg.seq_len
    shape = ",".join(str(s) for s in mesh.shape.values())
    report = {
        "topology": topology, "chip": chip.name, "device_kind": devices[0].device_kind,
        "num_devices": len(devices), "num_hosts": len({d.process_index for d in devices}),
        "mesh": dict(mesh.shape), "rules": rules_name,
        "train_bindings": [f"--gin.config.TrainConfig.mesh_shape=({shape})",
                           f"--gin.config.TrainConfig.sharding_rules='\"{rules_name}\"'"],
        "model": {"num_layers": model.num_layers, "d_model": model.d_model, "num_heads": model.num_heads,
                  "vocab_size": vocab, "dtype": str(np.dtype(model.dtype)),
                  "ffw": [type(f).__name__ for f, n in model.ffw_layers() for _ in range(n)],
                  "scan_layers": model.scan_layers, "remat": model.remat},
        # What Attention(impl=...) resolves to when compiled for this topology ('splash' on TPU).
        "attention_impl": _attention_impl(model.attention_impl, cfg.seq_len, mesh),
        "model_flops_per_step_maxtext": flops_lib.maxtext_train_flops_per_token(model, cfg.seq_len, micro) * tokens,
        "params": flops_lib.param_counts(model, cfg.seq_len, micro),
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "grad_accum_steps": cfg.grad_accum_steps,
        "tokens_per_step": tokens, "model_flops_per_step": count.train * tokens,
        "chip_spec": dataclasses.asdict(chip),
    }
    del model
    t1 = t2 = t3 = time.perf_counter()
    stage = "optimizer-state set-up (step.abstract_train_state)"
    try:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_table):
            setup, state, shardings = step_lib.abstract_train_state(cfg.model, tx, vocab, cfg.seq_len, mesh,
                                                                    rule_table)
            report["state_bytes_per_device"] = _state_bytes(state)
            train_step = step_lib.jit_train_step(
                step_lib.make_train_step(setup, tx, cfg.grad_accum_steps, skip_nonfinite=cfg.nonfinite == "skip"),
                shardings, setup)
            batch_spec = step_lib.batch_sharding(mesh, rule_table)
            batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len),
                                             np.float32 if k == "weights" else np.int32, sharding=batch_spec)
                     for k in step_lib.BATCH_KEYS}
            stage = "train step"
            t2 = time.perf_counter()
            lowered = train_step.lower(state, batch)
            t3 = time.perf_counter()
            compiled = lowered.compile(compiler_options=compiler_options or None)
    except Exception as e:  # noqa: BLE001 - the TPU compiler's out-of-memory is a JaxRuntimeError
        if not _is_oom(e):
            raise
        report.update(fits=False, failed_stage=stage, error=str(e)[:4000], setup_s=t2 - t0, lower_s=t3 - t2,
                      compile_s=time.perf_counter() - t3)
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
        report, compiled = _lower_and_compile(cfg, chip, topology, mesh_shape, rules, vocab_size, chip_config,
                                              compiler_options)
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


def main(argv: list[str] | None = None) -> int:
    from peer_jax import cli, gin_utils
    from peer_jax.sharding import RULE_PRESETS

    argv = sys.argv[1:] if argv is None else argv

    def add_arguments(p):
        p.add_argument("--topology", required=True,
                       help="GENERATION:SHAPE, e.g. v5e:16x16 (v5litepod-256), v4:4x4x4 (v4-128), v5p:4x4x4 (v5p-128)")
        p.add_argument("--mesh_shape", help="data,expert,model (one may be -1); default TrainConfig.mesh_shape")
        p.add_argument("--rules", choices=sorted(RULE_PRESETS),
                       help="sharding rules preset; default TrainConfig.sharding_rules")
        p.add_argument("--xla_option", action="append", default=[], metavar="NAME=VALUE",
                       help="TPU compiler option for this compile, e.g. xla_tpu_offload_gather_to_sparsecore=true "
                            "(repeatable)")
        p.add_argument("--vocab_size", type=int, help="tokenizer vocabulary size (needed when spm_path is remote)")
        p.add_argument("--chip_config", help="libtpu chip config (default: megacore for v4, else default)")
        p.add_argument("--json", help="write the report as JSON here")
        p.add_argument("--hlo_out", help="write the compiled program's HLO text here")

    try:
        args, bindings = gin_utils.command_line(argv, __doc__.splitlines()[0], add_arguments)
    except gin_utils.ConfigError as e:
        return cli.fail(e)
    if not args.gin_file:
        return cli.fail("--gin_file is required, e.g. --gin_file=configs/isoflop/paper/peer_2e19_L16_d1280_h20.gin")
    if not libtpu_available():
        return cli.fail("libtpu is not importable in this Python environment. Create the AOT environment "
                              "with `bash launch/setup_aot_venv.sh` and run this script with .venv-tpu/bin/python "
                              "(see launch/README.md).")
    mesh_shape = None
    if args.mesh_shape:
        try:
            mesh_shape = tuple(int(s) for s in args.mesh_shape.strip("()").split(","))
        except ValueError:
            return cli.fail(f"--mesh_shape={args.mesh_shape!r}: write data,expert,model, e.g. -1,1,4")
    options = {}
    for item in args.xla_option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            return cli.fail(f"--xla_option={item!r}: write NAME=VALUE, e.g. "
                                  "xla_tpu_offload_gather_to_sparsecore=true")
        options[name] = {"true": True, "false": False}.get(value.lower(), value)
    try:
        report = compile_train_step(args.gin_file, bindings, args.topology, mesh_shape=mesh_shape, rules=args.rules,
                                    vocab_size=args.vocab_size, chip_config=args.chip_config,
                                    compiler_options=options, hlo_out=args.hlo_out)
    except (gin_utils.ConfigError, ValueError, FileNotFoundError) as e:
        return cli.fail(e)
    report["command"] = " ".join(["scripts/aot_compile.py", *argv])
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if report.get("fits") else 1


if __name__ == "__main__":
    sys.exit(main())
