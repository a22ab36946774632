"""The compile table of docs/pod_scale.md: every method's 2e19 L16 d1280 point compiled for
TPU slices from this CPU host, before and after the pod settings of the paper grid files.

    .venv-tpu/bin/python scripts/pod_scale_table.py [--methods dense,peer] [--topologies v5e:16x16]
        [--variants before,unscanned,after] [--force]

One `scripts/aot_compile.py` subprocess per (method, topology, variant), one at a time; each
writes benchmarks/results/pod_scale/<method>_<topology>_<variant>.json (kept and reused unless
--force), then the table is printed and written to benchmarks/results/pod_scale/table.md.
Variants (the gin file is configs/isoflop/paper/<method>_2e19_L16_d1280_h20.gin in every one):

* ``after``     the gin file as written: its mesh, rules, scanned layers, attention 'auto'
                (splash on TPU). The whole command is the file, the topology and the vocabulary.
* ``unscanned`` the same with ``Transformer.scan_layers = False``: the compile-time baseline,
                and XLA's cost analysis of the whole program (it counts a scan's body once).
* ``before``    the settings of the earlier table (commit f384338): XLA attention, no scan,
                default rules, and the mesh that table used, on the current code.
* ``sparsecore`` ``after`` with the TPU compiler option xla_tpu_offload_gather_to_sparsecore
                (v5p/v6e have SparseCores): which gathers move there, and what it changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "pod_scale"
GIB = 1024**3
METHODS = ("dense", "moe_dropless", "moe", "pkm", "peer")
TOPOLOGIES = {"v5e:16x16": "v5e-256", "v5p:4x4x4": "v5p-128"}
# The meshes of the earlier table (docs/pod_scale.md at f384338); dropless was not in it and
# gets MoE's.
BEFORE_MESH = {
    "v5e:16x16": {"dense": "64,1,4", "moe": "32,4,2", "moe_dropless": "32,4,2", "pkm": "64,1,4", "peer": "64,1,4"},
    "v5p:4x4x4": {"dense": "64,1,1", "moe": "16,4,1", "moe_dropless": "16,4,1", "pkm": "16,1,4", "peer": "16,1,4"},
}


def gin_file(method: str) -> str:
    return f"configs/isoflop/paper/{method}_2e19_L16_d1280_h20.gin"


def command(method: str, topology: str, variant: str, json_path: Path) -> list[str]:
    cmd = ["scripts/aot_compile.py", f"--gin_file={gin_file(method)}", f"--topology={topology}", "--vocab_size=32000"]
    if variant == "unscanned":
        cmd.append("--gin.transformer.Transformer.scan_layers=False")
    elif variant == "before":
        cmd += ["--gin.transformer.Transformer.scan_layers=False",
                '--gin.transformer.Transformer.attention_impl="xla"',
                f"--mesh_shape={BEFORE_MESH[topology][method]}", "--rules=default"]
    elif variant == "sparsecore":
        cmd.append("--xla_option=xla_tpu_offload_gather_to_sparsecore=true")
    elif variant != "after":
        raise ValueError(f"unknown variant {variant!r}")
    return cmd + [f"--json={json_path}"]


def run(method: str, topology: str, variant: str, force: bool) -> dict:
    path = OUT / f"{method}_{topology.replace(':', '_')}_{variant}.json"
    if path.exists() and not force:
        return json.loads(path.read_text())
    cmd = command(method, topology, variant, path)
    print(f"... {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
    if proc.returncode not in (0, 1) or not path.exists():  # 1 = compiled but does not fit
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    report = json.loads(path.read_text())
    report["wall_s"], report["load_after"] = time.perf_counter() - t0, os.getloadavg()[0]
    path.write_text(json.dumps(report, indent=1, default=str))
    return report


def _gib(b) -> str:
    return f"{b / GIB:.2f}"


def row(r: dict, variant: str) -> str:
    mesh = "×".join(str(v) for v in r["mesh"].values())
    if r.get("error"):
        return (f"| {r['model']['ffw'][len(r['model']['ffw']) // 2]} | {variant} | {mesh} {r['rules']} | "
                f"does not fit: {r['error'].splitlines()[0][:120]} | | | | | |")
    m, c, e = r["memory"], r["collectives"]["by_kind"], r.get("estimate", {})
    need = max(m["total_bytes"], m["peak_memory_in_bytes"])
    state = r["state_bytes_per_device"]
    coll = " / ".join(_gib(c[k]["bytes"]) for k in ("all-gather", "reduce-scatter", "all-reduce"))
    other = sum(c[k]["bytes"] for k in ("all-to-all", "collective-permute"))
    coll += f" (+{_gib(other)} all-to-all/permute)" if other >= 0.005 * GIB else ""
    bounds = (f"{1e3 * e['step_time_compute_bound_s']:.1f} / {1e3 * e['step_time_hbm_bound_s']:.1f}"
              if e and not r["model"]["scan_layers"] else "scan: see unscanned")
    offloads = r.get("sparsecore_offloads") or []
    gathers = sum(o.endswith("/gather") for o in offloads)
    sc = f", SparseCore: {gathers} gathers + {len(offloads) - gathers} other" if offloads else ""
    return (f"| {variant} | {mesh} `{r['rules']}` | {'scan' if r['model']['scan_layers'] else 'unrolled'}, "
            f"{r['attention_impl']}{sc} | {_gib(state.get('params', 0))} / {_gib(state.get('opt_state', 0))} | "
            f"{_gib(m['total_bytes'])} ({_gib(m['peak_memory_in_bytes'])}) | "
            f"**{100 * (1 - need / r['chip_spec']['hbm_bytes']):.0f} %** | {coll} | {bounds} | "
            f"{r['compile_s']:.0f} |")


def table(reports: dict) -> str:
    head = ("| variant | mesh d×e×m, rules | layers, attention | state/dev GiB params / opt | "
            "memory/dev GiB total (peak) | HBM headroom | collectives/dev/step GiB all-gather / reduce-scatter / "
            "all-reduce | bound ms compute / HBM | compile s |\n|---|---|---|---|---|---|---|---|---|")
    out = []
    for method in METHODS:
        for topology, slice_name in TOPOLOGIES.items():
            rows = [(v, reports[(method, topology, v)]) for v in ("before", "unscanned", "after", "sparsecore")
                    if (method, topology, v) in reports]
            if not rows:
                continue
            out += [f"\n**{method}, {slice_name}** (`{topology}`)\n", head, *[row(r, v) for v, r in rows]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    p.add_argument("--variants", default="before,unscanned,after")
    p.add_argument("--force", action="store_true", help="recompile even where a JSON exists")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    reports = {}
    for method in args.methods.split(","):
        for topology in args.topologies.split(","):
            for variant in args.variants.split(","):
                reports[(method, topology, variant)] = run(method, topology, variant, args.force)
    # Every JSON on disk goes into the table, not just this invocation's.
    for path in sorted(OUT.glob("*.json")):
        method, _, rest = path.stem.partition("_v5")
        topology_tag, _, variant = ("v5" + rest).rpartition("_")
        topology = topology_tag.replace("_", ":", 1)
        if method in METHODS and topology in TOPOLOGIES:
            reports.setdefault((method, topology, variant), json.loads(path.read_text()))
    text = table(reports)
    (OUT / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
