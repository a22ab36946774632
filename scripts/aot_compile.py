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

import json
import os
import sys

# Never a real TPU backend: JAX runs on CPU, the TPU exists only as a topology description
# (read when jax is imported, so before peer_jax is).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    from peer_jax import aot, cli, gin_utils
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
    if not aot.libtpu_available():
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
        report = aot.compile_train_step(args.gin_file, bindings, args.topology, mesh_shape=mesh_shape, rules=args.rules,
                                    vocab_size=args.vocab_size, chip_config=args.chip_config,
                                    compiler_options=options, hlo_out=args.hlo_out)
    except (gin_utils.ConfigError, ValueError, FileNotFoundError) as e:
        return cli.fail(e)
    report["command"] = " ".join(["scripts/aot_compile.py", *argv])
    print(aot.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if report.get("fits") else 1


if __name__ == "__main__":
    sys.exit(main())
