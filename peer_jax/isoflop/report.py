"""Fits isoFLOP curves to finished sweep runs, with bootstrap intervals over seeds.

    python scripts/fit_isoflop.py --root results/isoflop_mini3/seed0 --root results/isoflop_mini3/seed1 \
        --root results/isoflop_mini3/seed2 --out results/isoflop_mini3/fit --unique_tokens 4010368

Reads ROOT/*/summary.json (written by scripts/isoflop_sweep.py, or by its `--summarize` for
runs trained elsewhere; points with status 'done'). **Each `--root` is one seed of the grid**:
runs with the same point name under different roots are seed replicates of that point (the
sweep's `--gin.config.TrainConfig.seed=S --gin.config.TrainConfig.data_seed=S` into its own
root). A point present under only some roots simply has fewer seeds.

Two estimates of each method's compute-optimal model, each with a bootstrap 95 % interval:
Approach 2 (parabola vertex per method and budget) and Approach 3 (L(N, D) per method), as
`peer_jax.isoflop.fit` describes; the intervals and PEER's comparisons as
`peer_jax.isoflop.bootstrap` describes.

Outputs in OUT: isoflop.png (primary eval set: mean over seeds with min–max bars, fitted
parabola, a star with its 95 % intervals at each optimum), isoflop_<task>.png for the other
eval sets, optimum.png (compute-optimal perplexity against budget, both approaches, with
intervals), isoflop_table.md and isoflop_fit.json (per method × budget: both estimates, their
`ci95`, and on PEER's rows `p_peer_lower` against every other method).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from peer_jax.isoflop import plots, robustness
from peer_jax.isoflop.bootstrap import fit_all
from peer_jax.isoflop.fit import METHOD_LONG, METHOD_NAMES, METHOD_ORDER, PARAM_KINDS, REFERENCE, Fit, as_list, label
from peer_jax.isoflop.grids import budget_tag


# ----------------------------------------------------------------------------- collecting


def _extra_evals(workdir: Path, step) -> dict[str, float]:
    """{task: loss} from `python -m peer_jax.eval` output (checkpoints/eval_step<step>.json)."""
    path = workdir / "checkpoints" / f"eval_step{step}.json"
    if step is None or not path.exists():
        return {}
    return {t: float(m["loss"]) for t, m in json.loads(path.read_text())["tasks"].items()}


def collect(roots: list[str | Path], params_kind: str) -> tuple[dict[tuple[str, float], list[dict]], list[str]]:
    """{(method, budget): points} from ROOT/*/summary.json of finished runs, and the eval tasks
    (primary first). Each root is one seed: a point's `loss` is {task: [loss per root that has
    it]}, `roots` the roots it came from. Eval losses come from the trainer's final eval
    (result.json) and, for further sets, from `python -m peer_jax.eval` on the final checkpoint."""
    by_name: dict[str, dict] = {}
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
            tokens = float(point.get("tokens") or result.get("step", 0) * point.get("tokens_per_step", 0))
            entry = by_name.setdefault(point["name"], {
                "name": point["name"],
                "method": point["method"],
                "budget": float(point["budget"]),
                "params": float(point["params"][params_kind]),
                "tokens": tokens,
                "flops_per_token": float(point.get("train_flops_per_token") or float(point["budget"]) / tokens),
                "loss": {},
                "roots": [],
                "wall_time_s": [],
                "cpu_models": [],
            })
            if str(root) in entry["roots"]:
                continue
            n_before = len(entry["roots"])
            for t, v in losses.items():
                lst = entry["loss"].setdefault(t, [])
                if len(lst) == n_before:  # tasks some seeds lack are left out of those seeds
                    lst.append(v)
            for other in entry["loss"].values():
                if other and len(other) > 1 and other[-1] == other[-2] and len(other) == n_before + 1:
                    print(f"warning: {point['name']}: identical {other[-1]:.6g} under {entry['roots'][-1]} and "
                          f"{root}: the same seed twice?", file=sys.stderr)
                    break
            entry["roots"].append(str(root))
            entry["wall_time_s"].append(s.get("wall_time_s"))
            entry["cpu_models"].append((s.get("host") or {}).get("cpu_model") or "unknown")
    groups: dict[tuple[str, float], list[dict]] = {}
    for e in by_name.values():
        n = len(e["roots"])
        e["loss"] = {t: v for t, v in e["loss"].items() if len(v) == n}
        groups.setdefault((e["method"], e["budget"]), []).append(e)
    return groups, tasks



# ----------------------------------------------------------------------------- outputs

# Table 1's column order (Curation, LAMBADA, Pile, Wikitext-103, C4), then the embedded sets.
COLUMN_ORDER = ("curation", "lambada", "pile", "wikitext103", "c4", "kjv", "shakespeare", "pydoc")


def _cell(value: float, ci: list | None, fmt: str = ".2f") -> str:
    return f"{value:{fmt}}" if ci is None else f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _window_note(fits: list[Fit]) -> str:
    cut = [f for f in fits if len(f.fit_points) < len(f.points)]
    if not cut:
        return ""
    w = max(len(f.fit_points) for f in cut)
    return f"; a curve with more than {w} sizes is fitted to the {w} consecutive sizes around its best"


def host_counts(fits: list[Fit]) -> dict[str, tuple[int, list[str]]]:
    """{CPU model: (runs, budgets with runs from it)} over every (point, seed) run of the fits."""
    out: dict[str, tuple[int, list[str]]] = {}
    for f in fits:
        for p in f.points:
            for m in p.get("cpu_models", []):
                n, by = out.get(m, (0, []))
                out[m] = (n + 1, by if budget_tag(f.budget) in by else by + [budget_tag(f.budget)])
    return out


def markdown_table(fits: list[Fit], tasks: list[str], params_kind: str, parametric: dict | None = None,
                   partial_replicates: bool = False) -> str:
    cols = sorted(tasks, key=lambda t: (COLUMN_ORDER.index(t) if t in COLUMN_ORDER else len(COLUMN_ORDER), t))
    seeds = max(f.seeds for f in fits)
    ci_note = " [bootstrap 95 % interval over seeds]" if any(f.ci95 for f in fits) else ""
    lines = [f"Perplexity of each method's compute-optimal model{ci_note}; optimum chosen on `{tasks[0]}`, "
             f"size = {params_kind.replace('_', ' ')} parameters; up to {seeds} seed(s) per point.", "",
             "**Approach 2** (vertex of the parabola in ln N" + _window_note(fits) + "):", "",
             "| method, budget | " + " | ".join(cols) + " | optimal params | optimal tokens |",
             "|---|" + "---|" * len(cols) + "---|---|"]
    for f in fits:
        ci = f.ci95 or {}
        mark = "" if f.from_fit else " †"
        cells = " | ".join(_cell(f.optimal_ppl.get(t, float("nan")), (ci.get("optimal_ppl") or {}).get(t))
                           for t in cols)
        lines.append(f"| {label(f)}{mark} | {cells} | {_cell(f.optimal_params, ci.get('optimal_params'), '.3g')} "
                     f"| {f.optimal_tokens:.3g} |")
    notes = [f"† {label(f)}: {f.note}" for f in fits if not f.from_fit]
    unstable = [f"{label(f)}: {100 * (1 - f.bootstrap_from_fit):.0f} %" for f in fits
                if f.bootstrap_from_fit is not None and f.bootstrap_from_fit < 1]
    if notes:
        lines += [""] + notes
    uneven = []
    for f in fits:
        counts = [len(as_list(p["loss"][tasks[0]])) for p in f.points if tasks[0] in p["loss"]]
        if counts and min(counts) != max(counts):
            uneven.append(f"{label(f)} ({min(counts)}–{max(counts)})")
    if uneven:
        lines += ["", "Seeds per size differ within " + "; ".join(uneven) + ": the best size and the window are "
                  "chosen on means over different seeds (a seed's offset moves only the sizes it covers); " + (
                      "a size with one seed does not move in the bootstrap, so these intervals understate seed noise "
                      "(--partial_replicates)." if partial_replicates else
                      "a curve with a one-seed size in its fitted window gets no bootstrap interval (that size "
                      "could not move).")]
    if unstable:
        lines += ["", "Bootstrap samples that fell back to the best observed point (vertex outside the range or "
                  "non-convex): " + "; ".join(unstable) + "."]
    a3 = [f for f in fits if f.approach3 is not None]
    if a3:
        lines += ["", f"**Approach 3** (L(N, D) = E + A/N^α + B/D^β per method, all budgets; `{tasks[0]}`):", "",
                  "| method, budget | ppl | optimal params | optimal tokens |", "|---|---|---|---|"]
        for f in a3:
            o, ci = f.approach3, f.approach3.get("ci95") or {}
            edge = " ‡" if o["at_edge"] else ""
            lines.append(f"| {label(f)}{edge} | {_cell(o['optimal_ppl'], ci.get('optimal_ppl'))} "
                         f"| {_cell(o['optimal_params'], ci.get('optimal_params'), '.3g')} | {o['optimal_tokens']:.3g} |")
        if any(f.approach3["at_edge"] for f in a3):
            lines += ["", "‡ the optimum lies on the edge of the budget's sampled sizes."]
        if parametric:
            lines += ["", "| method | E | A | α | B | β | rmse (loss) | observations |", "|---|---|---|---|---|---|---|---|"]
            for m, p in parametric.items():
                lines.append(f"| {METHOD_NAMES.get(m, m)} | {p['E']:.3f} | {p['A']:.3g} | {p['alpha']:.3f} "
                             f"| {p['B']:.3g} | {p['beta']:.3f} | {p['rmse']:.4f} | {p['n_obs']} |")
            bound = [f"{METHOD_NAMES.get(m, m)} ({', '.join(p['at_bound'])})" for m, p in parametric.items()
                     if p.get("at_bound")]
            if bound:
                lines += ["", "Constants on a bound of the fit: " + "; ".join(bound) + ". The data do not identify "
                          "them (the other constants absorb them): the fitted surface and its optima are read, not "
                          "the constants."]
    cmp = [f for f in fits if f.p_peer_lower]
    if cmp:
        others = [m for m in METHOD_ORDER if m != REFERENCE and any(m in f.p_peer_lower for f in cmp)]
        fallback: dict[float, set[str]] = {}
        for f in fits:
            if not f.from_fit:
                fallback.setdefault(f.budget, set()).add(f.method)
        lines += ["", f"**P(PEER lower)**: share of bootstrap samples in which PEER's compute-optimal `{tasks[0]}` "
                  "loss is below the other method's (Approach 2 / Approach 3):", "",
                  "| budget | " + " | ".join(METHOD_NAMES.get(m, m) for m in others) + " |",
                  "|---|" + "---|" * len(others)]
        for f in cmp:
            cells = []
            for m in others:
                c = f.p_peer_lower.get(m)
                if c is None:
                    cells.append("")
                    continue
                a2 = c["approach2"].get(tasks[0])
                s = "—" if a2 is None else f"{a2:.2f}" + (" †" if {REFERENCE, m} & fallback.get(f.budget, set()) else "")
                if c.get("approach3") is not None:
                    s += f" / {c['approach3']:.2f}"
                cells.append(s)
            lines.append(f"| {budget_tag(f.budget)} | " + " | ".join(cells) + " |")
        if any(fallback.get(f.budget, set()) & ({REFERENCE} | set(others)) for f in cmp):
            lines += ["", "† a curve without an optimum inside its sizes: the Approach 2 share compares its best "
                      "observed point, not an optimum."]
    hosts = host_counts(fits)
    if len(hosts) > 1:
        lines += ["", "Runs from " + str(len(hosts)) + " CPU models: " + "; ".join(
            f"{m}: {n} runs ({', '.join(by)})" for m, (n, by) in hosts.items()) + ". A run re-runs bit for bit "
            "only on its own CPU model; on another it drifts, for a routed model by about as much as a change of "
            "seed (docs/reproducibility.md, \"The drift between hosts\")."]
    legend = [f"{METHOD_NAMES[m]}: {METHOD_LONG[m]}" for m in METHOD_LONG if any(f.method == m for f in fits)]
    if legend:
        lines += [""] + ["- " + x for x in legend]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", action="append", required=True, help="sweep root, one per seed (repeatable)")
    p.add_argument("--out", help="output folder (default: <first root>/fit)")
    p.add_argument("--params", default="active_non_embedding", choices=PARAM_KINDS, help="x axis parameter count")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples (0: no intervals)")
    p.add_argument("--bootstrap_parametric", type=int, default=200,
                   help="of those, how many also refit Approach 3 (≈ 0.2 s per method each)")
    p.add_argument("--bootstrap_seed", type=int, default=0)
    p.add_argument("--no_parametric", action="store_true", help="skip Approach 3 (the L(N, D) fit)")
    p.add_argument("--partial_replicates", action="store_true",
                   help="intervals for a curve with any replicated point, not only when every point of its "
                        "window has 2+ seeds (the mini2 study's rule; such intervals understate seed noise)")
    p.add_argument("--window", type=int, default=5,
                   help="Approach 2 fits the WINDOW consecutive sizes centred on the best one (0: every size)")
    p.add_argument("--unique_tokens", type=float, default=None,
                   help="tokens in one epoch of the training split (the grid's grid.md states it): adds the "
                        "data-constrained Approach 3 variant to the robustness ranges")
    args = p.parse_args(argv)
    if args.window and args.window < 3:
        p.error(f"--window {args.window}: a parabola needs at least 3 sizes (0 fits every size)")
    groups, tasks = collect(args.root, args.params)
    if not groups:
        print(f"no finished runs (summary.json with status 'done') under {args.root}; for runs trained with "
              "`isoflop_sweep.py --print_commands` (a pod), copy them here and run "
              "`isoflop_sweep.py GRID --root ROOT --summarize` first", file=sys.stderr)
        return 1
    fits, parametric = fit_all(groups, tasks, args.params, args.bootstrap, args.bootstrap_seed,
                               parametric=not args.no_parametric, parametric_samples=args.bootstrap_parametric,
                               window=args.window, partial_replicates=args.partial_replicates)
    out = Path(args.out or Path(args.root[0]) / "fit")
    out.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tasks):
        plots.plot(fits, t, out / ("isoflop.png" if i == 0 else f"isoflop_{t}.png"), args.params)
    plots.plot_optimum(fits, tasks[0], out / "optimum.png")
    rob = robustness.robustness(groups, tasks, args.params, args.unique_tokens, args.window or None)
    for k, held in robustness.verdicts_held(rob, fits, METHOD_NAMES).items():
        rob["verdicts"][k]["holds"] = held
    table = (markdown_table(fits, tasks, args.params, parametric, args.partial_replicates) + "\n"
             + robustness.markdown(rob, fits, METHOD_NAMES))
    (out / "isoflop_table.md").write_text(table)
    (out / "isoflop_fit.json").write_text(json.dumps(
        {"params_kind": args.params, "eval_tasks": tasks, "roots": [str(r) for r in args.root],
         "approach2_window": args.window or None,
         "cpu_models": {m: n for m, (n, _) in host_counts(fits).items()},
         "bootstrap": {"samples": args.bootstrap, "parametric_samples": min(args.bootstrap, args.bootstrap_parametric),
                       "seed": args.bootstrap_seed,
                       "resampling": "seeds of each point, with replacement",
                       "intervals_for": "curves with a replicated point" if args.partial_replicates else
                       "curves whose every window point has 2+ seeds"},
         "parametric": parametric, "robustness": rob, "fits": [dataclasses.asdict(f) for f in fits]}, indent=1))
    print(table)
    print(f"wrote {out}/isoflop.png, optimum.png, isoflop_table.md, isoflop_fit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
