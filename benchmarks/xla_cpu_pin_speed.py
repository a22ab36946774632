"""What the XLA:CPU pin costs in speed: pinned against unpinned training runs, interleaved.

  python benchmarks/xla_cpu_pin_speed.py        # ~25 minutes on 2 busy CPU cores

Points: the tiny PEER model (configs/runs/tiny_cpu_peer.gin, batch 32 x 128) and the mini2
isoFLOP point peer_1e12_L1_d24_h1 (batch 16 x 128), each for --steps steps with the loss logged
at every step. Variants: ``unpinned`` (xla_cpu_pin=None, xla_cpu_threads=None: XLA:CPU uses
every ISA extension and core it finds), ``pinned`` (--pin, --threads) and ``cap_only``
(``--xla_cpu_max_isa`` and --threads, YNNPACK fusions left on). The pin must be set before the
backend starts, so every run is a fresh `python -m peer_jax.train` process; --rounds rounds
alternate the variants (order rotated every round) so that background load on the shared
machine hits all alike. Reported: the median step time over every logged step after the
first (compilation) of all rounds, and each variant's over unpinned. Writes
benchmarks/results/xla_cpu_pin_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from xla_cpu_bits import PIN, REPO_ROOT, THREADS, run_one  # noqa: E402

POINTS = {"tiny_peer": "configs/runs/tiny_cpu_peer.gin", "mini2_peer_1e12_L1_d24_h1":
          "configs/isoflop/mini2/peer_1e12_L1_d24_h1.gin"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pin", default="AVX2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks/results/xla_cpu_pin_speed.json"))
    a = p.parse_args(argv)
    variants = {"unpinned": dict(name="unpinned", gin=[f"--gin.{PIN}=None", f"--gin.{THREADS}=None"]),
                "pinned": dict(name="pinned", gin=[f'--gin.{PIN}="{a.pin}"', f"--gin.{THREADS}={a.threads}"]),
                # the ISA cap and threads alone, YNNPACK left on: what turning YNNPACK off costs
                "cap_only": dict(name="cap_only", flags=f"--xla_cpu_max_isa={a.pin}",
                                 gin=[f"--gin.{PIN}=None", f"--gin.{THREADS}={a.threads}"])}
    step_times = {(pt, v): [] for pt in POINTS for v in variants}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for pt, gin_file in POINTS.items():
                order = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
                for v in order:
                    run = run_one(gin_file, variants[v], a.steps, Path(tmp) / f"{pt}_{v}_{r}", all_step_times=True)
                    step_times[(pt, v)] += run["step_times"]
                    print(f"round {r} {pt:28s} {v:9s} median step {statistics.median(run['step_times']) * 1e3:.1f} ms "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
            load.append(os.getloadavg()[0])
    rows = []
    for pt in POINTS:
        med = {v: statistics.median(step_times[(pt, v)]) for v in variants}
        rows.append({"point": pt, "gin_file": POINTS[pt], "steps": a.steps, "rounds": a.rounds,
                     **{f"{v}_step_s": med[v] for v in variants},
                     **{f"{v}_over_unpinned": med[v] / med["unpinned"] for v in variants if v != "unpinned"}})
        print(f"{pt:28s} " + "  ".join(f"{v} {med[v] * 1e3:.1f} ms" for v in variants) + "  ratios "
              + " ".join(f"{v} {med[v] / med['unpinned']:.3f}" for v in variants if v != "unpinned"))
    out = {"command": "python benchmarks/xla_cpu_pin_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "pin": a.pin, "threads": a.threads, "load_average_1min": load, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
