"""Communication budget of memory-parallel PEER / PKM: every group size, compiled for a TPU slice.

    .venv-tpu/bin/python scripts/memory_parallel_table.py [--methods peer,pkm]
        [--topologies v5e:16x16,v5p:4x4x4] [--groups 2,4,...] [--force]

For each method (the paper grid's 2e19 L16 d1280 point, configs/isoflop/paper/<method>_2e19_L16_d1280_h20.gin)
and slice, one `scripts/aot_compile.py` subprocess per group size G = expert × model (model = 2, the
gin files' tensor-parallel width; expert = G / 2; data = devices / G) with the `memory_parallel`
rules, one at a time. Each writes
benchmarks/results/pod_scale/memory_parallel/<method>_<topology>_g<G>.json (kept and reused unless
--force). The table printed (and written to .../memory_parallel/table.md) has, per G: collective
bytes per device per step from the compiled HLO by kind (the first row: the layout before, the
method's `after` report of scripts/pod_scale_table.py with `fsdp_expert_tables`, copied to
.../memory_parallel/<method>_<topology>_before.json); the cost model of `peer_jax.comm_model`
for the sparse layer's lookup plus the dense model's all-reduce (read from the dense point's
`after` report); memory per device and HBM headroom; the compute bound (model FLOPs per step /
(devices × peak bf16 FLOP/s)); and the time to send the compiled collectives (an all-reduce
counted twice, as a ring sends it) at the per-chip ICI bandwidth of all ports, or of one torus
axis (`peer_jax.comm_model`). The dense point's `after` report closes each block, for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peer_jax import comm_model  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "pod_scale" / "memory_parallel"
DENSE = REPO / "benchmarks" / "results" / "pod_scale"
GB = 1e9
TOPOLOGIES = ("v5e:16x16", "v5p:4x4x4")  # v5e-256, v5p-128
MODEL_AXIS = 2
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")


def devices(topology: str) -> int:
    """Devices of a GENERATION:AxBxC topology: one per chip (v4 and v5p compile as megacore)."""
    n = 1
    for s in topology.partition(":")[2].split("x"):
        n *= int(s)
    return n


def mesh(topology: str, group: int) -> tuple[int, int, int]:
    return devices(topology) // group, group // MODEL_AXIS, MODEL_AXIS


def run(method: str, topology: str, group: int, force: bool) -> dict:
    path = OUT / f"{method}_{topology.replace(':', '_')}_g{group}.json"
    if path.exists() and not force:
        return json.loads(path.read_text())
    d, e, m = mesh(topology, group)
    cmd = ["scripts/aot_compile.py", f"--gin_file=configs/isoflop/paper/{method}_2e19_L16_d1280_h20.gin",
           f"--topology={topology}", "--vocab_size=32000", f"--mesh_shape={d},{e},{m}", "--rules=memory_parallel",
           f"--json={path}"]
    print(f"... {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
    if proc.returncode not in (0, 1) or not path.exists():  # 1 = compiled but does not fit
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    report = json.loads(path.read_text())
    report["wall_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(report, indent=1, default=str))
    return report


def predicted(report: dict, topology: str, group: int) -> float | None:
    """Cost model of the lookup plus the dense point's compiled all-reduce on the same slice."""
    dense_path = DENSE / f"dense_{topology.replace(':', '_')}_after.json"
    if not dense_path.exists():
        return None
    dense = json.loads(dense_path.read_text())["collectives"]["total_bytes"]
    d, e, m = mesh(topology, group)
    gin = report["gin_files"][0]
    peer = "peer_" in Path(gin).name
    lookup = comm_model.lookup_bytes(tokens=report["tokens_per_step"], slots=128 if peer else 256,
                                     d=report["model"]["d_model"], rows=1024**2, tables=2 if peer else 1,
                                     data=d, expert=e, model=m)
    return dense + lookup.total


def row(report: dict, label: str) -> str:
    head = f"| {label} |"
    if report.get("error") or not report.get("memory"):
        return head + " does not fit (compiler: out of HBM) | | | | | | |"
    chip = report["chip_spec"]
    by_kind, total = report["collectives"]["by_kind"], report["collectives"]["total_bytes"]
    kinds = " / ".join(f"{by_kind[k]['bytes'] / GB:.2f}" for k in KINDS)
    mem = report["memory"]
    need = max(mem["total_bytes"], mem["peak_memory_in_bytes"])
    compute = report["model_flops_per_step"] / (report["num_devices"] * chip["peak_bf16_flops"])
    fast, slow = comm_model.comm_time_s(comm_model.wire_bytes(by_kind), chip["name"])
    return (f"{head} {kinds} | **{total / GB:.2f}** | {{model}} | {need / 2**30:.2f} | "
            f"{100 * (1 - need / chip['hbm_bytes']):.0f} % | {1e3 * compute:.1f} | {1e3 * fast:.1f} – {1e3 * slow:.1f} |")


def group_row(report: dict, topology: str, group: int) -> str:
    model = predicted(report, topology, group)
    text = row(report, f"{group} | {'×'.join(map(str, mesh(topology, group)))}")
    return text.replace("{model}", "" if model is None else f"{model / GB:.2f}")


def table(reports: dict) -> str:
    head = ("| G | mesh d×e×m | collectives GB all-gather / reduce-scatter / all-reduce / all-to-all | total GB | "
            "cost model GB | memory GiB | HBM headroom | compute bound ms | wire time ms (all ports – one axis) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    out = []
    for method in ("peer", "pkm"):
        for topology in sorted({tp for _, tp, _ in reports}):
            rows = sorted((g, r) for (mt, tp, g), r in reports.items() if mt == method and tp == topology)
            if rows:
                out += [f"\n**{method}, `{topology}`** ({devices(topology)} chips)\n", head]
                before = OUT / f"{method}_{topology.replace(':', '_')}_before.json"
                if before.exists():
                    r = json.loads(before.read_text())
                    out.append(row(r, f"before: `{r['rules']}` | {'×'.join(str(v) for v in r['mesh'].values())}")
                               .replace("{model}", "—"))
                out += [group_row(r, topology, g) for g, r in rows]
                dense = DENSE / f"dense_{topology.replace(':', '_')}_after.json"
                if dense.exists():
                    r = json.loads(dense.read_text())
                    out.append(row(r, f"dense | {'×'.join(str(v) for v in r['mesh'].values())}").replace("{model}", "—"))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="peer,pkm")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES), help="GENERATION:SHAPE, comma-separated")
    p.add_argument("--groups", help="comma-separated group sizes (default: every power of two from 2 to the slice)")
    p.add_argument("--force", action="store_true", help="recompile even where a JSON exists")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        for topology in args.topologies.split(","):
            groups = ([int(g) for g in args.groups.split(",")] if args.groups
                      else [2**i for i in range(1, devices(topology).bit_length())])
            for g in groups:
                run(method, topology, g, args.force)
    reports = {}
    for path in sorted(OUT.glob("*_g*.json")):  # every compiled point on disk goes into the table
        method, _, rest = path.stem.partition("_v5")
        topology_tag, _, g = ("v5" + rest).rpartition("_g")
        reports[(method, topology_tag.replace("_", ":", 1), int(g))] = json.loads(path.read_text())
    text = table(reports)
    (OUT / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
