"""Fits isoFLOP parabolas to finished sweep runs; writes plots, a Table-1 style table and JSON.

    python scripts/fit_isoflop.py --root runs/isoflop_mini --out runs/isoflop_mini/fit

Reads ROOT/*/summary.json (written by scripts/isoflop_sweep.py, or by its `--summarize` for
runs trained elsewhere; points with status 'done').
For each (method, budget) it fits the final eval loss of the primary eval set (the first of
TrainConfig.eval_tasks: C4 in the paper's grid, KJV validation in the mini grid) as a
parabola in log(parameters), loss ≈ a·u² + b·u + c with u = ln N, and takes the vertex
u* = −b / 2a as the compute-optimal size N* = e^{u*}.

Parameters: by default **active non-embedding parameters** (the parameters a token uses: all
dense weights, and for a sparse layer its router / query network / keys plus the experts or
memories a token is routed to, see `peer_jax.flops.param_counts`). Training FLOPs per token
are ≈ 6 × this number (+ attention), so at a fixed budget it is the quantity traded against
tokens, and dense and sparse models share one axis. Embeddings are left out as in Kaplan et
al. `--params total` or `--params non_embedding` fit against those counts instead (for PEER
and PKM, total parameters are dominated by the N-row tables, which grow with d_model).

Table 1 of the paper gives, for each method and budget, the perplexity of the compute-optimal
model on several eval sets. Here the optimum N* is chosen on the primary eval set; for every
eval set (one column each) the table reports exp(parabola fitted to that set's losses, at N*).
With fewer than 3 sizes, a non-convex fit (a ≤ 0), or a vertex outside the sampled range the
best observed run is reported instead and the row is marked (†).

Outputs in OUT: isoflop.png (primary eval set; one line per method/budget, observed points,
fitted parabola, a star at each optimum), isoflop_<task>.png for the other eval sets,
isoflop_table.md and isoflop_fit.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

METHOD_NAMES = {"dense": "Dense", "moe": "MoE", "pkm": "PKM", "peer": "PEER"}
METHOD_ORDER = ("dense", "moe", "pkm", "peer")
PARAM_KINDS = ("active_non_embedding", "non_embedding", "total", "active")


# ----------------------------------------------------------------------------- fitting


def fit_parabola(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of y ≈ a·u² + b·u + c."""
    a, b, c = np.polyfit(np.asarray(u, np.float64), np.asarray(y, np.float64), 2)
    return float(a), float(b), float(c)


def vertex(a: float, b: float, c: float) -> tuple[float, float]:
    """(u*, y*) of the parabola's vertex (a minimum when a > 0)."""
    u = -b / (2 * a)
    return u, a * u * u + b * u + c


@dataclasses.dataclass
class Fit:
    method: str
    budget: float
    params_kind: str
    points: list[dict]  # {name, params, tokens, loss: {task: loss}}
    coeffs: dict[str, tuple[float, float, float] | None]  # per eval task
    optimal_params: float
    optimal_tokens: float
    optimal_loss: dict[str, float]
    optimal_ppl: dict[str, float]
    from_fit: bool  # False: best observed run (too few points, non-convex or vertex outside)
    note: str = ""


def fit_group(method: str, budget: float, points: list[dict], tasks: list[str], params_kind: str) -> Fit:
    """Fits one isoFLOP curve. `points`: {name, params, tokens, loss: {task: final eval loss}}."""
    points = sorted(points, key=lambda p: p["params"])
    u = np.log([p["params"] for p in points])
    primary = tasks[0]
    coeffs: dict[str, tuple | None] = {}
    for t in tasks:
        ys = [p["loss"].get(t) for p in points]
        coeffs[t] = fit_parabola(u, np.array(ys)) if len(points) >= 3 and None not in ys else None
    note, from_fit = "", False
    best = min(points, key=lambda p: p["loss"][primary])
    u_star = math.log(best["params"])
    if coeffs[primary] is None:
        note = f"{len(points)} sizes (< 3): best observed run"
    elif coeffs[primary][0] <= 0:
        note = "non-convex fit: best observed run"
    else:
        u_v, _ = vertex(*coeffs[primary])
        if u.min() <= u_v <= u.max():
            u_star, from_fit = u_v, True
        else:
            note = f"vertex at {math.exp(u_v):.3g} params lies outside the sampled sizes: best observed run"
    loss = {}
    for t in tasks:
        if from_fit and coeffs[t] is not None:
            a, b, c = coeffs[t]
            loss[t] = a * u_star * u_star + b * u_star + c
        else:
            loss[t] = best["loss"].get(t, float("nan"))
    # Tokens at the optimum: interpolate ln(tokens) linearly in ln(params) between the runs.
    tokens = math.exp(np.interp(u_star, u, np.log([p["tokens"] for p in points])))
    n_star = math.exp(u_star) if from_fit else best["params"]
    return Fit(method, budget, params_kind, points, coeffs, n_star, tokens, loss,
               {t: math.exp(v) for t, v in loss.items()}, from_fit, note)


# ----------------------------------------------------------------------------- collecting


def _extra_evals(workdir: Path, step) -> dict[str, float]:
    """{task: loss} from `python -m peer_jax.eval` output (checkpoints/eval_step<step>.json)."""
    path = workdir / "checkpoints" / f"eval_step{step}.json"
    if step is None or not path.exists():
        return {}
    return {t: float(m["loss"]) for t, m in json.loads(path.read_text())["tasks"].items()}


def collect(roots: list[str | Path], params_kind: str) -> tuple[dict[tuple[str, float], list[dict]], list[str]]:
    """{(method, budget): points} from ROOT/*/summary.json of finished runs, and the eval tasks
    (primary first). Eval losses come from the trainer's final eval (result.json) and, for
    further sets, from `python -m peer_jax.eval` run on the final checkpoint."""
    groups: dict[tuple[str, float], list[dict]] = {}
    tasks: list[str] = []
    for root in roots:
        for path in sorted(Path(root).glob("*/summary.json")):
            s = json.loads(path.read_text())
            if s.get("status") != "done":
                continue
            result, point = s["result"], s["point"]
            run_tasks = [k.split("/")[1] for k in result if k.startswith("eval/") and k.endswith("/loss")]
            losses = {t: float(result[f"eval/{t}/loss"]) for t in run_tasks}
            # the primary task (the first of TrainConfig.eval_tasks) is what the trainer reports as eval_loss
            primary = [t for t in run_tasks if losses[t] == result.get("eval_loss")][:1]
            for t, v in _extra_evals(path.parent, result.get("step")).items():
                losses.setdefault(t, v)
            if primary and not tasks:
                tasks.append(primary[0])
            tasks.extend(t for t in losses if t not in tasks)
            groups.setdefault((point["method"], float(point["budget"])), []).append({
                "name": point["name"],
                "params": float(point["params"][params_kind]),
                "tokens": float(point.get("tokens") or result.get("step", 0) * point.get("tokens_per_step", 0)),
                "loss": losses,
                "wall_time_s": s.get("wall_time_s"),
            })
    return groups, tasks


def fit_all(groups, tasks: list[str], params_kind: str) -> list[Fit]:
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = sorted(groups, key=lambda k: (k[1], order.get(k[0], 99), k[0]))
    return [fit_group(m, b, groups[(m, b)], tasks, params_kind) for m, b in keys]


# ----------------------------------------------------------------------------- outputs


def _label(f: Fit) -> str:
    """'PEER 6e18', as in the paper's Table 1."""
    mantissa, exponent = f"{f.budget:.2e}".split("e")
    return f"{METHOD_NAMES.get(f.method, f.method)} {float(mantissa):g}e{int(exponent)}"


def plot(fits: list[Fit], task: str, path: Path, params_kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "tab:gray", "moe": "tab:blue", "pkm": "tab:green", "peer": "tab:red"}
    budgets = sorted({f.budget for f in fits})
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in fits:
        color = colors.get(f.method, None)
        ls = styles[budgets.index(f.budget) % len(styles)]
        xs = np.array([p["params"] for p in f.points if task in p["loss"]])
        ys = np.array([p["loss"][task] for p in f.points if task in p["loss"]])
        if not len(xs):
            continue
        line = ax.plot(xs, np.exp(ys), "o", color=color, ms=4)[0]
        color = line.get_color()
        if f.coeffs.get(task) is not None:
            grid = np.linspace(np.log(xs.min()), np.log(xs.max()), 100)
            a, b, c = f.coeffs[task]
            ax.plot(np.exp(grid), np.exp(a * grid**2 + b * grid + c), ls, color=color, label=_label(f))
        else:
            ax.plot(xs, np.exp(ys), ls, color=color, label=_label(f))
        ax.plot([f.optimal_params], [f.optimal_ppl[task]], "*", color=color, ms=14, mec="black", mew=0.6)
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters ({params_kind.replace('_', ' ')})")
    ax.set_ylabel(f"{task} perplexity")
    ax.set_title(f"isoFLOP curves ({task}); stars: compute-optimal models")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Table 1's column order (Curation, LAMBADA, Pile, Wikitext-103, C4), then the embedded sets.
COLUMN_ORDER = ("curation", "lambada", "pile", "wikitext103", "c4", "kjv", "pydoc")


def markdown_table(fits: list[Fit], tasks: list[str], params_kind: str) -> str:
    cols = sorted(tasks, key=lambda t: (COLUMN_ORDER.index(t) if t in COLUMN_ORDER else len(COLUMN_ORDER), t))
    lines = [f"Perplexity of each method's compute-optimal model (optimum chosen on `{tasks[0]}`; "
             f"size = {params_kind.replace('_', ' ')} parameters).", "",
             "| method, budget | " + " | ".join(cols) + " | optimal params | optimal tokens |",
             "|---|" + "---|" * len(cols) + "---|---|"]
    for f in fits:
        mark = "" if f.from_fit else " †"
        cells = " | ".join(f"{f.optimal_ppl.get(t, float('nan')):.2f}" for t in cols)
        lines.append(f"| {_label(f)}{mark} | {cells} | {f.optimal_params:.3g} | {f.optimal_tokens:.3g} |")
    notes = [f"† {_label(f)}: {f.note}" for f in fits if not f.from_fit]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", action="append", required=True, help="sweep root (repeatable)")
    p.add_argument("--out", help="output folder (default: <first root>/fit)")
    p.add_argument("--params", default="active_non_embedding", choices=PARAM_KINDS, help="x axis parameter count")
    args = p.parse_args(argv)
    groups, tasks = collect(args.root, args.params)
    if not groups:
        print(f"no finished runs (summary.json with status 'done') under {args.root}; for runs trained with "
              "`isoflop_sweep.py --print_commands` (a pod), copy them here and run "
              "`isoflop_sweep.py GRID --root ROOT --summarize` first", file=sys.stderr)
        return 1
    fits = fit_all(groups, tasks, args.params)
    out = Path(args.out or Path(args.root[0]) / "fit")
    out.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tasks):
        plot(fits, t, out / ("isoflop.png" if i == 0 else f"isoflop_{t}.png"), args.params)
    table = markdown_table(fits, tasks, args.params)
    (out / "isoflop_table.md").write_text(table)
    (out / "isoflop_fit.json").write_text(json.dumps(
        {"params_kind": args.params, "eval_tasks": tasks, "fits": [dataclasses.asdict(f) for f in fits]}, indent=1))
    print(table)
    print(f"wrote {out}/isoflop.png, isoflop_table.md, isoflop_fit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
