"""Plans the CPU wall time of an isoFLOP grid from measured runs.

    python configs/isoflop/plan.py configs/isoflop/mini2 --measured results/superseded/isoflop_mini \
        --measured results/superseded/isoflop_mini_seed1 --measured 'results/isoflop_mini_lr/*' [--budgets 1e13]

For every point of GRID it takes the training throughput (counted training FLOPs per second of
wall time, compile and evals included) measured on finished runs (summary.json under the
--measured roots, glob patterns allowed) of the same method and shape, at any budget; with none,
the same method's nearest measured shape (in parameters) scaled by the two shapes' ratio of
`scale_flops` (counted FLOPs, plus for a dropless MoE on CPU the E − 1 experts that ragged_dot
computes and discards). Predicted wall time = realised FLOPs / throughput. Throughput depends on
the machine's load: the median of the measured runs is used and the spread is printed.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import sys
from pathlib import Path

from peer_jax.isoflop import grids, sweep


def scale_flops(entry: dict) -> float:
    """Training FLOPs per token that the CPU actually executes (counted + dropless overhead)."""
    f = entry["train_flops_per_token"]
    if entry["method"] == "moe_dropless":
        f += 3 * 15 * entry["flops_terms"].get("moe_experts", 0.0)  # 16 experts: 15 computed and discarded
    return f


def measured(roots: list[str]) -> dict[tuple[str, str], list[float]]:
    """{(method, shape tag): [training FLOPs/s of each finished run]}."""
    out: dict[tuple[str, str], list[float]] = {}
    for pattern in roots:
        for root in sorted(glob.glob(pattern)) or [pattern]:
            for path in Path(root).glob("*/summary.json"):
                s = json.loads(path.read_text())
                p = s["point"]
                if s.get("status") != "done" or not s.get("wall_time_s"):
                    continue
                out.setdefault((p["method"], _tag(p)), []).append(p["realised_flops"] / s["wall_time_s"])
    return out


def _tag(e: dict) -> str:
    return grids.Shape(e["num_layers"], e["d_model"], e["num_heads"]).tag


def plan(points: list[dict], rates: dict, all_points: list[dict] | None = None) -> list[dict]:
    """Predicted minutes per point; `all_points` (default `points`) supply the shapes' FLOPs."""
    rows = []
    for e in points:
        tag = _tag(e)
        own = rates.get((e["method"], tag))
        source = tag
        if own:
            rate = statistics.median(own)
            spread = (min(own), max(own))
        else:  # nearest measured shape of the method, scaled by executed FLOPs per counted FLOP
            cands = [(k[1], v) for k, v in rates.items() if k[0] == e["method"]]
            if not cands:
                rows.append({**e, "minutes": None, "source": "no measurement"})
                continue
            same = {_tag(x): x for x in (all_points or points) if x["method"] == e["method"]}
            def dist(t):
                ref = same.get(t)
                return abs(math.log(ref["params"]["active_non_embedding"] / e["params"]["active_non_embedding"])) \
                    if ref else 99.0
            source, vals = min(cands, key=lambda c: dist(c[0]))
            ref = same.get(source)
            ratio = (e["train_flops_per_token"] / scale_flops(e)) / (ref["train_flops_per_token"] / scale_flops(ref)) \
                if ref else 1.0
            rate = statistics.median(vals) * ratio
            spread = (min(vals) * ratio, max(vals) * ratio)
            source = f"{source} (scaled)"
        rows.append({**e, "minutes": e["realised_flops"] / rate / 60, "minutes_range": (
            e["realised_flops"] / spread[1] / 60, e["realised_flops"] / spread[0] / 60), "source": source})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", help="grid folder with grid.json")
    p.add_argument("--measured", action="append", required=True, help="root of finished runs (glob ok; repeatable)")
    p.add_argument("--budgets", help="comma-separated budgets to plan (default: all)")
    args = p.parse_args(argv)
    points = all_points = json.loads((Path(args.grid) / "grid.json").read_text())["points"]
    points = sweep.select(points, budgets=args.budgets)
    rows = plan(points, measured(args.measured), all_points)
    print("| point | steps | predicted minutes (median, range of measured load) | throughput from |")
    print("|---|---|---|---|")
    total, lo, hi = 0.0, 0.0, 0.0
    for r in rows:
        if r["minutes"] is None:
            print(f"| {r['name']} | {r['num_steps']} | ? | {r['source']} |")
            continue
        total, lo, hi = total + r["minutes"], lo + r["minutes_range"][0], hi + r["minutes_range"][1]
        print(f"| {r['name']} | {r['num_steps']} | {r['minutes']:.1f} ({r['minutes_range'][0]:.1f}–"
              f"{r['minutes_range'][1]:.1f}) | {r['source']} |")
    print(f"\ntotal: {total / 60:.1f} h (range {lo / 60:.1f}–{hi / 60:.1f} h) for {len(rows)} points, one at a time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
