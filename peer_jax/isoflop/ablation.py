"""Tables and plots of the PEER ablations (paper Fig. 3a, Fig. 3b, Table 2) from finished runs.

    python scripts/ablation_table.py --root results/ablate/seed0 --root results/ablate/seed1 \
        --out results/ablate/report

Reads ROOT/<point>/summary.json and result.json of the `ablate` grid
(`peer_jax.isoflop.grids`: every variant trains PEER's mini2 1e12 optimum for the 1e12 budget,
so variants with more active experts train fewer steps). Each `--root` is one seed; a point's
value is the mean over the seeds that have it, with the min–max range over seeds.

* Fig. 3a: KJV perplexity against the total number of experts N (h·k = 32, query BN on).
* Fig. 3b: KJV perplexity against the active experts h·k (N = 128², query BN on).
* Table 2: query BatchNorm on/off at N = 32² and 128²: KJV perplexity, expert usage (% of the N
  experts given any router mass over the eval set) and unevenness (KL of the summed router mass
  to uniform), each as mean and range over seeds.

Writes OUT/ablation.md, OUT/ablation.json, OUT/fig3a_experts.png and OUT/fig3b_active.png.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

NAME = re.compile(r"^peer_n(\d+)_h(\d+)k(\d+)(_nobn)?_(\w+?)_(L\d+_d\d+_h\d+)$")


def load(roots: list[str], task: str) -> dict[tuple, list[dict]]:
    """{(sqrt_n, heads, top_k, bn): [per-seed metrics]} of the finished ablation points."""
    runs: dict[tuple, list[dict]] = {}
    for root in roots:
        for summary in sorted(Path(root).glob("*/summary.json")):
            m = NAME.match(summary.parent.name)
            s = json.loads(summary.read_text())
            if not m or s.get("status") != "done":
                continue
            r = json.loads((summary.parent / "result.json").read_text())
            block = next((k.split("/")[3] for k in r if k.startswith(f"eval/{task}/blocks/")), None)
            prefix = f"eval/{task}/blocks/{block}/ffw"
            key = (int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) is None)
            runs.setdefault(key, []).append({
                "root": root, "steps": r["step"], "loss": r[f"eval/{task}/loss"],
                "usage": r.get(f"{prefix}/usage"), "unevenness": r.get(f"{prefix}/unevenness")})
    return runs


def stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def _ppl(runs: list[dict]) -> dict:
    return stats([math.exp(r["loss"]) for r in runs])


def _fmt(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    if s["mean"] is None:
        return "—"
    text = f"{scale * s['mean']:.{digits}f}"
    return text + (f" ({scale * s['min']:.{digits}f}–{scale * s['max']:.{digits}f})" if s["n"] > 1 else "")


def _plot(path: Path, xs, ys, xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    mean = [y["mean"] for y in ys]
    err = [[y["mean"] - y["min"] for y in ys], [y["max"] - y["mean"] for y in ys]]
    ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KJV validation perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", action="append", required=True, help="one seed's sweep root (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="kjv", help="eval set (default: KJV validation)")
    args = p.parse_args(argv)
    runs = load(args.root, args.task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"roots": args.root, "task": args.task}
    lines = [f"# PEER ablations ({args.task} eval; seeds = {len(args.root)} roots: "
             f"{', '.join(args.root)})", ""]

    fig3a = [(n, runs[(n, 4, 8, True)]) for n in (16, 32, 64, 128) if (n, 4, 8, True) in runs]
    report["fig3a"] = [{"num_experts": n * n, "steps": rs[0]["steps"], "seeds": len(rs), "ppl": _ppl(rs)}
                       for n, rs in fig3a]
    lines += ["## Fig. 3a: total experts N (h = 4, k = 8, query BN)", "",
              "| N | steps | seeds | KJV ppl (range) |", "|---|---|---|---|"]
    lines += [f"| {n}² = {n * n} | {rs[0]['steps']} | {len(rs)} | {_fmt(_ppl(rs))} |" for n, rs in fig3a]
    if len(fig3a) >= 2:
        _plot(out / "fig3a_experts.png", [n * n for n, _ in fig3a], [_ppl(rs) for _, rs in fig3a],
              "total experts N", "PEER, 1e12 FLOPs, h·k = 32")

    fig3b = [(h, runs[(128, h, 8, True)]) for h in (1, 2, 4, 8) if (128, h, 8, True) in runs]
    report["fig3b"] = [{"heads": h, "top_k": 8, "active": 8 * h, "steps": rs[0]["steps"], "seeds": len(rs),
                        "ppl": _ppl(rs)} for h, rs in fig3b]
    lines += ["", "## Fig. 3b: active experts h·k (N = 128², k = 8, query BN)", "",
              "| h | h·k | steps | seeds | KJV ppl (range) |", "|---|---|---|---|---|"]
    lines += [f"| {h} | {8 * h} | {rs[0]['steps']} | {len(rs)} | {_fmt(_ppl(rs))} |" for h, rs in fig3b]
    if len(fig3b) >= 2:
        _plot(out / "fig3b_active.png", [8 * h for h, _ in fig3b], [_ppl(rs) for _, rs in fig3b],
              "active experts h·k", "PEER, 1e12 FLOPs, N = 128²")

    report["table2"] = []
    lines += ["", "## Table 2: query BatchNorm (h = 4, k = 8)", "",
              "| N | query BN | seeds | KJV ppl | usage % | unevenness |", "|---|---|---|---|---|---|"]
    for n in (32, 128):
        for bn in (True, False):
            rs = runs.get((n, 4, 8, bn))
            if not rs:
                continue
            row = {"num_experts": n * n, "query_bn": bn, "seeds": len(rs), "ppl": _ppl(rs),
                   "usage": stats([r["usage"] for r in rs]), "unevenness": stats([r["unevenness"] for r in rs])}
            report["table2"].append(row)
            lines.append(f"| {n}² | {'on' if bn else 'off'} | {len(rs)} | {_fmt(row['ppl'])} | "
                         f"{_fmt(row['usage'], 100, 1)} | {_fmt(row['unevenness'])} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
