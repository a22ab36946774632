"""Iso-wall-clock view of an isoFLOP budget: final eval loss against predicted CPU training time.

    python -m peer_jax.isoflop.wallclock --timing benchmarks/results/isoflop_step_time/mini2_1e13.json \
        --root results/superseded/isoflop_mini2/seed0 --root results/superseded/isoflop_mini2/seed1 --out OUT

The isoFLOP fit compares methods at equal training FLOPs; this compares them at equal time on
the machine the step times were measured on. The timing JSON is what
`benchmarks/isoflop_step_time.py` writes: every shape of every method at one budget, each
PEER/PKM shape once per compute mode ('efficient', 'native'). A shape's **wall time** is its
training steps × its median train-step time there (evals, checkpoints and start-up left
out). Its **loss** is the final eval loss of the primary eval set as the fit reads it
(`peer_jax.isoflop.report.collect`: ROOT/<point>/summary.json of finished runs, one root per
seed, the mean over seeds). Per method and compute mode the **best** shape is the one with the
lowest loss; the table gives its wall time relative to dense's best shape.

Outputs in OUT: wallclock_<budget>.png (loss against wall time, a star on each method's best
shape), wallclock_<budget>.md (the table) and wallclock_<budget>.json (every row).

CPU wall time is not TPU wall time: the caption of both says so (`caption`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from peer_jax import cli
from peer_jax.isoflop.fit import METHOD_NAMES, METHOD_ORDER, as_list
from peer_jax.isoflop.grids import budget_tag
from peer_jax.isoflop.plots import COLORS
from peer_jax.isoflop.report import collect

REFERENCE = ("dense", None)  # the best shape every wall time is set against


def caption(timing: dict) -> str:
    h = timing.get("host") or {}
    return (f"CPU wall time ({h.get('cpu_model', 'unknown CPU')}, {h.get('usable_cpus', '?')} thread(s), XLA:CPU "
            f"{h.get('xla_cpu_isa')}): training steps × median train-step time measured on this host, evals and "
            "start-up left out. This is not TPU wall time: on a TPU the dense matmuls run far closer to peak than "
            "the gathers of PEER and PKM, so the ranking can differ.")


def label(method: str, compute: str | None) -> str:
    return METHOD_NAMES.get(method, method) + (f" ({compute})" if compute else "")


def rows(timing: dict, groups: dict, task: str) -> tuple[list[dict], list[str]]:
    """One row per timed variant that has a finished run at the timing's budget, and the names of
    the timed variants without one."""
    budget = float(timing["budget"])
    points = {p["name"]: p for (_, b), pts in groups.items() if math.isclose(b, budget, rel_tol=1e-9) for p in pts}
    out, missing = [], []
    for v in timing["variants"]:
        p = points.get(v["point"])
        if p is None or task not in p["loss"]:
            missing.append(v["name"])
            continue
        losses = as_list(p["loss"][task])
        out.append({
            "name": v["name"], "point": v["point"], "method": v["method"], "compute": v.get("compute"),
            "shape": f"L{v['num_layers']} d{v['d_model']}", "params": p["params"], "num_steps": v["num_steps"],
            "step_s_median": v["step_s_median"], "wall_s": v["num_steps"] * v["step_s_median"],
            "loss": float(np.mean(losses)), "seeds": len(losses),
            "recorded_wall_time_s": p.get("wall_time_s"),  # the sweep's runs, evals included, as they ran
        })
    return out, missing


def best(rs: list[dict]) -> dict[tuple[str, str | None], dict]:
    """Each (method, compute mode)'s lowest-loss row, with `rel_wall` = its wall time ÷ that of
    dense's best row (None without a dense row), `edge` when it is the smallest or largest of
    that method's rows (its timed shapes with a finished run; a lone row is both), where the
    optimum may lie beyond them, and `seeds_uneven` when those shapes have different numbers
    of seeds (the pick compares means over different seeds)."""
    out: dict[tuple[str, str | None], dict] = {}
    mine: dict[tuple[str, str | None], list[dict]] = {}
    for r in rs:
        key = (r["method"], r["compute"])
        mine.setdefault(key, []).append(r)
        if key not in out or r["loss"] < out[key]["loss"]:
            out[key] = r
    ref = out.get(REFERENCE)
    return {k: {**r, "rel_wall": r["wall_s"] / ref["wall_s"] if ref else None,
                "edge": r["params"] in (min(x["params"] for x in mine[k]), max(x["params"] for x in mine[k])),
                "seeds_uneven": len({x["seeds"] for x in mine[k]}) > 1}
            for k, r in out.items()}


def _order(key: tuple[str, str | None]) -> tuple:
    method, compute = key
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, method, compute or ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown(rs: list[dict], bests: dict, timing: dict, task: str, missing: list[str]) -> str:
    counts: dict = {}
    for r in rs:
        counts[(r["method"], r["compute"])] = counts.get((r["method"], r["compute"]), 0) + 1
    seeds = max(r["seeds"] for r in rs)
    lines = [
        f"Iso-wall-clock view of grid `{timing['grid']}` at {budget_tag(float(timing['budget']))} FLOPs: each "
        f"method's best shape (lowest final {task} eval loss, mean over up to {seeds} seed(s)) and its predicted "
        "training wall time.",
        "",
        f"**{caption(timing)}**",
        "",
        f"| method | compute | best shape | {task} loss | seeds | steps | step time | wall time | × dense's best | shapes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(bests, key=_order):
        b = bests[key]
        rel = "—" if b["rel_wall"] is None else f"{b['rel_wall']:.2f}"
        lines.append(f"| {METHOD_NAMES.get(b['method'], b['method'])} | {b['compute'] or '—'} | "
                     f"{b['shape']}{' †' if b['edge'] else ''} | "
                     f"{b['loss']:.4f} | {b['seeds']} | {b['num_steps']} | {1e3 * b['step_s_median']:.1f} ms | "
                     f"{_duration(b['wall_s'])} | {rel} | {counts[key]} |")
    load = timing.get("loadavg_before", [float("nan")])[0], timing.get("loadavg_after", [float("nan")])[0]
    lines += ["", f"Step times: `benchmarks/isoflop_step_time.py` ({timing.get('git')}), {timing.get('rounds')} "
              f"interleaved rounds × {timing.get('steps')} steps per variant, 1-minute load average "
              f"{load[0]:.1f} before and {load[1]:.1f} after; XLA:CPU pin {timing.get('xla_cpu_pin')}, "
              f"{timing.get('xla_cpu_threads')} thread(s)."]
    edge = sorted({METHOD_NAMES.get(b["method"], b["method"]) for b in bests.values() if b["edge"]})
    if edge:
        lines += ["", f"† the smallest or largest of the method's finished shapes ({', '.join(edge)}): its optimum "
                  "may lie beyond them."]
    uneven = sorted({METHOD_NAMES.get(b["method"], b["method"]) for b in bests.values() if b["seeds_uneven"]})
    if uneven:
        lines += ["", f"Seeds differ across the shapes of {', '.join(uneven)}: the best shape is picked on means over "
                  "different seeds."]
    if missing:
        lines += ["", f"Timed without a finished run (left out): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot(rs: list[dict], bests: dict, timing: dict, task: str, path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.6))
    for key in sorted(bests, key=_order):
        method, compute = key
        # in order of model size: the line is the budget's isoFLOP curve, drawn against time
        pts = sorted((r for r in rs if (r["method"], r["compute"]) == key), key=lambda r: r["params"])
        native = compute == "native"
        color = COLORS.get(method)
        ax.plot([r["wall_s"] for r in pts], [r["loss"] for r in pts], "--" if native else "-", marker="o",
                mfc="white" if native else color, color=color, ms=4, lw=1.1, label=label(method, compute))
        b = bests[key]
        ax.plot([b["wall_s"]], [b["loss"]], "*", color=color, ms=14, mec=color if native else "black",
                mew=0.9 if native else 0.6, mfc="white" if native else color)
        ax.annotate(b["shape"], (b["wall_s"], b["loss"]), textcoords="offset points", xytext=(6, -10), fontsize=6.5)
    ax.set_xscale("log")
    ax.set_xlabel("predicted CPU training wall time (s): steps × median step time on this host")
    ax.set_ylabel(f"final {task} eval loss")
    ax.set_title(f"iso-wall-clock, grid {timing['grid']} at {budget_tag(float(timing['budget']))} FLOPs: shapes "
                 "joined in order of size; stars: each method's lowest loss", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(caption(timing), 150)), fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--timing", required=True, help="JSON of benchmarks/isoflop_step_time.py")
    p.add_argument("--root", action="append", required=True, help="sweep root of one seed (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", default=None, help="eval set (default: the primary one, the first of eval_tasks)")
    args = p.parse_args(argv)
    try:
        timing = json.loads(Path(args.timing).read_text())
    except (OSError, ValueError) as e:
        return cli.fail(f"--timing={args.timing}: {cli.first_line(e)}")
    groups, tasks = collect(args.root, "active_non_embedding")
    task = args.task or (tasks[0] if tasks else None)
    if task is None or task not in tasks:
        return cli.fail(f"--task={task}: the finished runs under {args.root} have eval sets {tasks}; pick one of them.")
    rs, missing = rows(timing, groups, task)
    if not rs:
        return cli.fail(f"no timed variant of {args.timing} has a finished run under {args.root} at budget "
                        f"{timing['budget']:g}; check --root.")
    bests = best(rs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"wallclock_{budget_tag(float(timing['budget']))}"
    (out / f"{stem}.md").write_text(markdown(rs, bests, timing, task, missing))
    plot(rs, bests, timing, task, out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps({
        "timing": args.timing, "roots": args.root, "task": task, "caption": caption(timing), "rows": rs,
        "best": [bests[k] for k in sorted(bests, key=_order)], "missing": missing}, indent=1))
    print((out / f"{stem}.md").read_text())
    if missing:
        print(f"warning: {len(missing)} timed variant(s) without a finished run left out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.exit_cli(main())
