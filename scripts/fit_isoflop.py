"""Fits isoFLOP curves to finished sweep runs, with bootstrap intervals over seeds.

    python scripts/fit_isoflop.py --root results/isoflop_mini --root results/isoflop_mini_seed1 \
        --out results/isoflop_mini/fit

Reads ROOT/*/summary.json (written by scripts/isoflop_sweep.py, or by its `--summarize` for
runs trained elsewhere; points with status 'done'). **Each `--root` is one seed of the grid**:
runs with the same point name under different roots are seed replicates of that point (the
sweep's `--gin.config.TrainConfig.seed=S --gin.config.TrainConfig.data_seed=S` into its own
root). A point present under only some roots simply has fewer seeds.

Two estimates of each method's compute-optimal model, each with a bootstrap 95 % interval:

* **Approach 2 (parabola vertex**, Hoffmann et al. 2022 §3.2): per (method, budget), the final
  eval loss of the primary eval set (the first of TrainConfig.eval_tasks: C4 in the paper's
  grid, KJV validation in the mini grid), every seed of every point, is fitted as a parabola in
  u = ln N, and the vertex u* = −b / 2a gives N* = e^{u*}. **Window** (`--window W`, default 5):
  with more than W sizes, only the W consecutive sizes centred on the best observed one (mean
  over its seeds; shifted inward at the grid's ends) are fitted, so sizes far from the optimum,
  where a loss curve is not parabolic, do not drag the vertex (an off-centre grid otherwise biases
  it); `--window 0` fits every size. With fewer than 3 sizes, a
  non-convex fit (a ≤ 0) or a vertex outside the fitted sizes, the best observed point (mean
  over its seeds) is reported instead and the row is marked (†). Every other eval set (one
  column each, Table 1 of the paper) reports exp(its own parabola at N*).
* **Approach 3 (parametric**, Hoffmann et al. §3.3): per method, over all its budgets,
  L(N, D) = E + A / N^α + B / D^β with D = training tokens, fitted to the primary eval loss
  (Huber loss δ = 1e-3 on log L, as Hoffmann et al.; scipy's least_squares from a grid of
  starting points). At budget C the optimum minimises L(N, C / F(N)) over N in the budget's
  sampled range, where F(N) is the training FLOPs per token of the method's grid shapes
  (interpolated in log-log; the grid's own relation, attention and logits included).
  An optimum on the edge of the range is flagged.

Bootstrap: in each of `--bootstrap` samples (default 1000), every point's seeds are resampled
with replacement (as many draws as it has seeds) and the estimates are recomputed with exactly
the rules above (fallbacks included): Approach 2 in every sample, Approach 3 in the first
`--bootstrap_parametric` (default 200; each refit starts from the full-data solution and one
other point). `ci95` is the 2.5–97.5 % percentile interval.
Intervals and comparisons are given only for curves (method × budget) with at least one point
run with two or more seeds; a curve of single-seed points gets none (null), whatever other
curves have. PEER is compared with every other method at every budget: the fraction of bootstrap samples
in which PEER's compute-optimal loss is lower (samples of different methods are independent
runs, so sample i of one is paired with sample i of the other). Two seeds give crude intervals
(each point's mean takes only 3 values); they measure seed noise of the runs, not the choice
of shapes or budgets.

Parameters (the x axis): by default **active non-embedding parameters** (the parameters a token
uses: all dense weights, and for a sparse layer its router / query network / keys plus the
experts or memories a token is routed to, see `peer_jax.flops.param_counts`). Training FLOPs
per token are ≈ 6 × this number (+ attention), so at a fixed budget it is the quantity traded
against tokens, and dense and sparse models share one axis. Embeddings are left out as in
Kaplan et al. `--params total` or `--params non_embedding` fit against those counts instead.

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
import math
import sys
import warnings
from pathlib import Path

import numpy as np

METHOD_NAMES = {"dense": "Dense", "moe_dropless": "MoE", "moe": "MoE-EC", "pkm": "PKM", "peer": "PEER"}
METHOD_LONG = {"moe_dropless": "dropless token choice, top-1 (FLOP-matched to dense; the study's MoE row)",
               "moe": "expert choice, capacity factor 1 (the paper's stated MoE setting)"}
METHOD_ORDER = ("dense", "moe_dropless", "moe", "pkm", "peer")
PARAM_KINDS = ("active_non_embedding", "non_embedding", "total", "active")
REFERENCE = "peer"  # the method compared with every other one


# ----------------------------------------------------------------------------- Approach 2: parabola


def fit_parabola(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of y ≈ a·u² + b·u + c."""
    a, b, c = np.polyfit(np.asarray(u, np.float64), np.asarray(y, np.float64), 2)
    return float(a), float(b), float(c)


def vertex(a: float, b: float, c: float) -> tuple[float, float]:
    """(u*, y*) of the parabola's vertex (a minimum when a > 0)."""
    u = -b / (2 * a)
    return u, a * u * u + b * u + c


def _as_list(v) -> list[float]:
    return [float(x) for x in v] if isinstance(v, (list, tuple, np.ndarray)) else [float(v)]


@dataclasses.dataclass
class Fit:
    method: str
    budget: float
    params_kind: str
    points: list[dict]  # {name, params, tokens, loss: {task: loss or [loss per seed]}}
    fit_points: list[str]  # names of the points the parabolas were fitted to (the window)
    coeffs: dict[str, tuple[float, float, float] | None]  # per eval task
    optimal_params: float
    optimal_tokens: float
    optimal_loss: dict[str, float]
    optimal_ppl: dict[str, float]
    from_fit: bool  # False: best observed point (too few sizes, non-convex or vertex outside)
    note: str = ""
    seeds: int = 1  # most seeds of any point
    ci95: dict | None = None  # bootstrap percentile intervals of the estimates above
    bootstrap_from_fit: float | None = None  # share of bootstrap samples whose estimate is a vertex
    approach3: dict | None = None  # the parametric estimate at this budget, with its ci95
    p_peer_lower: dict | None = None  # on PEER's rows: {other method: {approach: P(PEER lower)}}


def window_around(best: int, n: int, window: int | None) -> range:
    """The `window` consecutive indices of 0..n-1 centred on `best`, shifted inward at the ends
    (all n when window is 0/None or ≥ n)."""
    if not window or window >= n:
        return range(n)
    start = min(max(best - window // 2, 0), n - window)
    return range(start, start + window)


def fit_group(method: str, budget: float, points: list[dict], tasks: list[str], params_kind: str,
              window: int | None = None) -> Fit:
    """Fits one isoFLOP curve (Approach 2). `points`: {name, params, tokens, loss: {task: final
    eval loss, or a list of them, one per seed}}; every seed is one observation of the fit.
    `window`: fit only that many consecutive sizes centred on the best observed one."""
    points = sorted(points, key=lambda p: p["params"])
    u_pts = np.log([p["params"] for p in points])
    primary = tasks[0]
    mean = [{t: float(np.mean(_as_list(v))) for t, v in p["loss"].items()} for p in points]
    best = min(range(len(points)), key=lambda i: mean[i][primary])
    sel = window_around(best, len(points), window)
    coeffs: dict[str, tuple | None] = {}
    for t in tasks:
        obs = [(_as_list(points[i]["loss"][t]) if t in points[i]["loss"] else None) for i in sel]
        if len(sel) >= 3 and None not in obs:
            u = np.concatenate([np.full(len(o), u_pts[i]) for o, i in zip(obs, sel)])
            coeffs[t] = fit_parabola(u, np.concatenate(obs))
        else:
            coeffs[t] = None
    note, from_fit = "", False
    u_star = float(u_pts[best])
    if coeffs[primary] is None:
        note = f"{len(points)} sizes (< 3): best observed point"
    elif coeffs[primary][0] <= 0:
        note = "non-convex fit: best observed point"
    else:
        u_v, _ = vertex(*coeffs[primary])
        if u_pts[sel[0]] <= u_v <= u_pts[sel[-1]]:
            u_star, from_fit = u_v, True
        else:
            where = "the sampled sizes" if len(sel) == len(points) else "the fitted window of sizes"
            note = f"vertex at {math.exp(u_v):.3g} params lies outside {where}: best observed point"
    loss = {}
    for t in tasks:
        if from_fit and coeffs[t] is not None:
            a, b, c = coeffs[t]
            loss[t] = a * u_star * u_star + b * u_star + c
        else:
            loss[t] = mean[best].get(t, float("nan"))
    # Tokens at the optimum: interpolate ln(tokens) linearly in ln(params) between the runs.
    tokens = math.exp(np.interp(u_star, u_pts, np.log([p["tokens"] for p in points])))
    n_star = math.exp(u_star) if from_fit else points[best]["params"]
    seeds = max(len(_as_list(p["loss"][primary])) for p in points)
    return Fit(method, budget, params_kind, points, [points[i]["name"] for i in sel], coeffs, n_star, tokens, loss,
               {t: math.exp(v) for t, v in loss.items()}, from_fit, note, seeds)


# ----------------------------------------------------------------------------- Approach 3: L(N, D)

PARAMETRIC_NAMES = ("E", "A", "alpha", "B", "beta")
HUBER_DELTA = 1e-3


def _parametric_loss(x, log_n, log_d):
    """ln L of L = E + e^a / N^α + e^b / D^β, x = (E, a, α, b, β)."""
    e, a, alpha, b, beta = x
    return np.log(e + np.exp(a - alpha * log_n) + np.exp(b - beta * log_d))


def _parametric_jac(x, log_n, log_d):
    e, a, alpha, b, beta = x
    t1, t2 = np.exp(a - alpha * log_n), np.exp(b - beta * log_d)
    inv = 1.0 / (e + t1 + t2)
    return np.stack([inv, t1 * inv, -log_n * t1 * inv, t2 * inv, -log_d * t2 * inv], axis=1)


def fit_parametric(n, d, loss, starts: list | None = None) -> dict:
    """Fits L(N, D) = E + A/N^α + B/D^β to observed losses (Huber δ = 1e-3 on ln L).

    `starts`: starting points (E, ln A, α, ln B, β); by default a grid. Returns {E, A, alpha,
    B, beta, x (the raw solution), rmse (of L), n_obs}."""
    from scipy.optimize import least_squares

    log_n, log_d = np.log(np.asarray(n, np.float64)), np.log(np.asarray(d, np.float64))
    y = np.asarray(loss, np.float64)
    log_y = np.log(y)
    lo = np.array([0.0, -30.0, 0.0, -30.0, 0.0])
    hi = np.array([float(y.min()), 60.0, 3.0, 60.0, 3.0])
    if starts is None:
        starts = []
        for e_frac in (0.5, 0.9):
            e0 = e_frac * y.min()
            for alpha in (0.25, 0.6):
                for beta in (0.25, 0.6):
                    gap = max(y.mean() - e0, 1e-3) / 2  # each term ≈ half the reducible loss
                    starts.append((e0, math.log(gap) + alpha * np.median(log_n), alpha,
                                   math.log(gap) + beta * np.median(log_d), beta))
    best = None
    for x0 in starts:
        x0 = np.clip(np.asarray(x0, np.float64), lo + 1e-9, hi - 1e-9)
        with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                r = least_squares(lambda x: _parametric_loss(x, log_n, log_d) - log_y, x0, bounds=(lo, hi),
                                  jac=lambda x: _parametric_jac(x, log_n, log_d),
                                  loss="huber", f_scale=HUBER_DELTA, x_scale="jac", max_nfev=2000)
            except ValueError:
                continue
        if np.isfinite(r.cost) and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        raise RuntimeError("the parametric fit failed from every starting point")
    e, a, alpha, b, beta = (float(v) for v in best.x)
    pred = np.exp(_parametric_loss(best.x, log_n, log_d))
    return {"E": e, "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta, "x": [float(v) for v in best.x],
            "rmse": float(np.sqrt(np.mean((pred - y) ** 2))), "n_obs": int(len(y))}


def parametric_optimum(fitted: dict, budget: float, flops_fn, n_range: tuple[float, float],
                       grid_points: int = 400) -> dict:
    """The compute-optimal (N, D, loss) of a fitted L(N, D) at `budget`: minimises
    L(N, budget / flops_fn(N)) over N log-spaced in `n_range`; `at_edge` when it lands on an end."""
    log_n = np.linspace(math.log(n_range[0]), math.log(n_range[1]), grid_points)
    log_d = np.log(budget) - np.log(flops_fn(np.exp(log_n)))
    curve = _parametric_loss(np.asarray(fitted["x"]), log_n, log_d)
    i = int(np.argmin(curve))
    return {"optimal_params": float(math.exp(log_n[i])), "optimal_tokens": float(math.exp(log_d[i])),
            "optimal_loss": float(math.exp(curve[i])), "optimal_ppl": float(math.exp(math.exp(curve[i]))),
            "at_edge": i in (0, grid_points - 1)}


def flops_per_token_fn(points: list[dict]):
    """F(N): training FLOPs per token of a method's grid shapes, as a smooth function of N: a
    quadratic in log-log through the shapes (within 1 % on the mini grid; a piecewise-linear
    interpolation would put kinks, and so spurious optima, at the sampled sizes)."""
    pairs = sorted({(p["params"], p["flops_per_token"]) for p in points})
    x = np.log([n for n, _ in pairs])
    y = np.log([f for _, f in pairs])
    if len(x) == 1:
        return lambda n: np.exp(y[0] + np.log(n) - x[0])
    coeffs = np.polyfit(x, y, min(2, len(x) - 1))
    return lambda n: np.exp(np.polyval(coeffs, np.log(n)))


def approach3(groups: dict, primary: str, method: str, starts=None) -> tuple[dict, dict[float, dict]]:
    """Fits L(N, D) over all budgets of `method`; returns (fitted, {budget: optimum})."""
    pts = [p for (m, _), ps in groups.items() if m == method for p in ps]
    n, d, y = [], [], []
    for p in pts:
        for v in _as_list(p["loss"][primary]):
            n.append(p["params"]), d.append(p["tokens"]), y.append(v)
    fitted = fit_parametric(n, d, y, starts)
    fn = flops_per_token_fn(pts)
    optima = {}
    for (m, budget), ps in groups.items():
        if m == method:
            sizes = [p["params"] for p in ps]
            optima[budget] = parametric_optimum(fitted, budget, fn, (min(sizes), max(sizes)))
    return fitted, optima


# ----------------------------------------------------------------------------- bootstrap over seeds


def resample_seeds(groups: dict, rng: np.random.Generator) -> dict:
    """A copy of `groups` in which every point's seeds are drawn with replacement (the same
    draw for every eval task: one seed is one run)."""
    out = {}
    for key, pts in groups.items():
        new = []
        for p in pts:
            k = max(len(_as_list(v)) for v in p["loss"].values())
            idx = rng.integers(0, k, size=k)
            new.append({**p, "loss": {t: [_as_list(v)[i] for i in idx] if len(_as_list(v)) == k else v
                                      for t, v in p["loss"].items()}})
        out[key] = new
    return out


def _ci(samples) -> list[float] | None:
    s = np.asarray([x for x in samples if x is not None and np.isfinite(x)], np.float64)
    if len(s) == 0:
        return None
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


def bootstrap(groups: dict, tasks: list[str], params_kind: str, num_samples: int, seed: int = 0,
              parametric: int = 0, parametric_starts: dict | None = None, window: int | None = None) -> dict:
    """Bootstrap samples of both estimates: {(method, budget): {"approach2": [sample dicts],
    "approach3": [sample dicts]}}; Approach 3 (≈ 0.2 s a refit) on the first `parametric`
    samples only. `parametric_starts`: {method: the full-data solution}; each refit starts there
    and at one other point."""
    rng = np.random.default_rng(seed)
    out = {key: {"approach2": [], "approach3": []} for key in groups}
    methods = sorted({m for m, _ in groups})
    for i in range(num_samples):
        g = resample_seeds(groups, rng)
        for key, pts in g.items():
            f = fit_group(key[0], key[1], pts, tasks, params_kind, window)
            out[key]["approach2"].append({"optimal_params": f.optimal_params, "optimal_tokens": f.optimal_tokens,
                                          "optimal_loss": f.optimal_loss, "from_fit": f.from_fit})
        if i >= parametric:
            continue
        for m in methods:
            starts = None
            if parametric_starts and m in parametric_starts:
                x = parametric_starts[m]  # the full-data solution, and two others against local minima
                starts = [x, (0.5 * x[0], x[1], 0.5, x[3], 0.5)]
            try:
                _, optima = approach3(g, tasks[0], m, starts)
            except RuntimeError:
                optima = {}
            for budget in [b for mm, b in groups if mm == m]:
                out[(m, budget)]["approach3"].append(optima.get(budget))
    return out


def intervals_approach2(samples: list[dict], tasks: list[str]) -> dict:
    return {
        "optimal_params": _ci(s["optimal_params"] for s in samples),
        "optimal_tokens": _ci(s["optimal_tokens"] for s in samples),
        "optimal_loss": {t: _ci(s["optimal_loss"].get(t) for s in samples) for t in tasks},
        "optimal_ppl": {t: _ci(math.exp(s["optimal_loss"][t]) for s in samples if t in s["optimal_loss"])
                        for t in tasks},
    }


def intervals_approach3(samples: list[dict | None]) -> dict:
    ok = [s for s in samples if s is not None]
    return {k: _ci(s[k] for s in ok) for k in ("optimal_params", "optimal_tokens", "optimal_loss", "optimal_ppl")}


def p_lower(a: list, b: list) -> float | None:
    """Share of paired samples in which a < b (pairs with a missing sample left out)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)]
    return float(np.mean([x < y for x, y in pairs])) if pairs else None


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
    groups: dict[tuple[str, float], list[dict]] = {}
    for e in by_name.values():
        n = len(e["roots"])
        e["loss"] = {t: v for t, v in e["loss"].items() if len(v) == n}
        groups.setdefault((e["method"], e["budget"]), []).append(e)
    return groups, tasks


def fit_all(groups, tasks: list[str], params_kind: str, bootstrap_samples: int = 0, seed: int = 0,
            parametric: bool = True, parametric_samples: int | None = None,
            window: int | None = None) -> tuple[list[Fit], dict]:
    """Approach 2 per (method, budget) and Approach 3 per method, with bootstrap intervals and
    PEER's comparisons. Returns (fits, {method: parametric fit with its ci95})."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = sorted(groups, key=lambda k: (k[1], order.get(k[0], 99), k[0]))
    fits = [fit_group(m, b, groups[(m, b)], tasks, params_kind, window) for m, b in keys]
    by_key = {(f.method, f.budget): f for f in fits}
    primary = tasks[0]
    params: dict[str, dict] = {}
    if parametric:
        for m in sorted({m for m, _ in groups}, key=lambda m: order.get(m, 99)):
            n_obs = sum(len(p["loss"][primary]) for (mm, _), ps in groups.items() if mm == m for p in ps)
            if n_obs < 6:  # five parameters
                continue
            fitted, optima = approach3(groups, primary, m)
            params[m] = fitted
            for b, opt in optima.items():
                by_key[(m, b)].approach3 = dict(opt)
    seeds = max(f.seeds for f in fits)
    if bootstrap_samples <= 0 or seeds < 2:
        return fits, params
    starts = {m: tuple(p["x"]) for m, p in params.items()}
    n3 = bootstrap_samples if parametric_samples is None else min(parametric_samples, bootstrap_samples)
    samples = bootstrap(groups, tasks, params_kind, bootstrap_samples, seed, parametric=n3 if params else 0,
                        parametric_starts=starts, window=window)
    for f in fits:
        if f.seeds < 2:  # no point of this curve has a replicate: resampling cannot move it
            continue
        s = samples[(f.method, f.budget)]
        f.ci95 = intervals_approach2(s["approach2"], tasks)
        f.bootstrap_from_fit = float(np.mean([x["from_fit"] for x in s["approach2"]]))
        if f.approach3 is not None:
            ok = [x for x in s["approach3"] if x is not None]
            f.approach3["ci95"] = intervals_approach3(ok)
            f.approach3["bootstrap_at_edge"] = float(np.mean([x["at_edge"] for x in ok])) if ok else None
    for m in params:  # intervals of the fitted constants themselves are not kept: E, A, α trade off
        params[m]["bootstrap_failures"] = sum(
            x is None for (mm, _), s in samples.items() if mm == m for x in s["approach3"])
    for f in fits:
        if f.method != REFERENCE or f.seeds < 2:
            continue
        ref = samples[(f.method, f.budget)]
        f.p_peer_lower = {}
        for g in fits:
            if g.budget != f.budget or g.method == REFERENCE or g.seeds < 2:
                continue
            other = samples[(g.method, g.budget)]
            cmp = {"approach2": {t: p_lower([x["optimal_loss"].get(t) for x in ref["approach2"]],
                                            [x["optimal_loss"].get(t) for x in other["approach2"]]) for t in tasks}}
            if ref["approach3"] and other["approach3"]:  # the same first samples of both
                cmp["approach3"] = p_lower([x and x["optimal_loss"] for x in ref["approach3"]],
                                           [x and x["optimal_loss"] for x in other["approach3"]])
            f.p_peer_lower[g.method] = cmp
    return fits, params


# ----------------------------------------------------------------------------- outputs


def _budget(b: float) -> str:
    mantissa, exponent = f"{b:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _label(f: Fit) -> str:
    """'PEER 6e18', as in the paper's Table 1."""
    return f"{METHOD_NAMES.get(f.method, f.method)} {_budget(f.budget)}"


COLORS = {"dense": "tab:gray", "moe_dropless": "tab:blue", "moe": "tab:cyan", "pkm": "tab:green", "peer": "tab:red"}


def _err(value: float, ci: list | None) -> list[list[float]] | None:
    return None if ci is None else [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]]


def plot(fits: list[Fit], task: str, path: Path, params_kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({f.budget for f in fits})
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for f in fits:
        color = COLORS.get(f.method, None)
        ls = styles[budgets.index(f.budget) % len(styles)]
        pts = [p for p in f.points if task in p["loss"]]
        if not pts:
            continue
        xs = np.array([p["params"] for p in pts])
        obs = [np.exp(_as_list(p["loss"][task])) for p in pts]
        ys = np.array([np.exp(np.mean(np.log(o))) for o in obs])
        yerr = np.array([[y - o.min() for y, o in zip(ys, obs)], [o.max() - y for y, o in zip(ys, obs)]])
        line = ax.errorbar(xs, ys, yerr=yerr if f.seeds > 1 else None, fmt="o", color=color, ms=3.5,
                           capsize=2, lw=0.8)[0]
        color = line.get_color()
        if f.coeffs.get(task) is not None:  # drawn over the sizes it was fitted to
            fitted = [p["params"] for p in pts if p["name"] in f.fit_points]
            grid = np.linspace(np.log(min(fitted)), np.log(max(fitted)), 100)
            a, b, c = f.coeffs[task]
            ax.plot(np.exp(grid), np.exp(a * grid**2 + b * grid + c), ls, color=color, label=_label(f), lw=1.2)
        else:
            ax.plot(xs, ys, ls, color=color, label=_label(f), lw=1.2)
        ci = f.ci95 or {}
        ax.errorbar([f.optimal_params], [f.optimal_ppl[task]],
                    xerr=_err(f.optimal_params, ci.get("optimal_params")),
                    yerr=_err(f.optimal_ppl[task], (ci.get("optimal_ppl") or {}).get(task)),
                    fmt="*", color=color, ms=13, mec="black", mew=0.6, capsize=3, lw=1.0)
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters ({params_kind.replace('_', ' ')})")
    ax.set_ylabel(f"{task} perplexity")
    seeds = max(f.seeds for f in fits)
    ax.set_title(f"isoFLOP curves ({task}), {seeds} seed(s): points = geometric mean, bars = min–max;\n"
                 "stars: compute-optimal models (parabola vertex) with bootstrap 95 % intervals", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_optimum(fits: list[Fit], task: str, path: Path) -> None:
    """Compute-optimal perplexity against budget, per method: Approach 2 (filled) and
    Approach 3 (open), with bootstrap 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    methods = [m for m in METHOD_ORDER if any(f.method == m for f in fits)]
    methods += sorted({f.method for f in fits} - set(methods))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(methods):
        mf = sorted((f for f in fits if f.method == m), key=lambda f: f.budget)
        shift = 1 + 0.04 * (i - (len(methods) - 1) / 2)
        xs = [f.budget * shift for f in mf]
        ys = [f.optimal_ppl[task] for f in mf]
        err = [_err(f.optimal_ppl[task], ((f.ci95 or {}).get("optimal_ppl") or {}).get(task)) for f in mf]
        yerr = None if any(e is None for e in err) else np.array([[e[0][0] for e in err], [e[1][0] for e in err]])
        ax.errorbar(xs, ys, yerr=yerr, fmt="o-", color=COLORS.get(m), capsize=3, ms=5,
                    label=f"{METHOD_NAMES.get(m, m)} (parabola vertex)")
        a3 = [f for f in mf if f.approach3 is not None]
        if a3:  # Approach 3 fits the primary eval set, the one this plot shows
            xs3 = [f.budget * shift * 1.015 for f in a3]
            ys3 = [f.approach3["optimal_ppl"] for f in a3]
            err3 = [_err(f.approach3["optimal_ppl"], (f.approach3.get("ci95") or {}).get("optimal_ppl")) for f in a3]
            yerr3 = None if any(e is None for e in err3) else np.array([[e[0][0] for e in err3],
                                                                        [e[1][0] for e in err3]])
            ax.errorbar(xs3, ys3, yerr=yerr3, fmt="s:", color=COLORS.get(m), mfc="white", capsize=3, ms=4,
                        label=f"{METHOD_NAMES.get(m, m)} (L(N, D) fit)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"{task} perplexity of the compute-optimal model")
    ax.set_title("compute-optimal perplexity with bootstrap 95 % intervals over seeds", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def markdown_table(fits: list[Fit], tasks: list[str], params_kind: str, parametric: dict | None = None) -> str:
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
        lines.append(f"| {_label(f)}{mark} | {cells} | {_cell(f.optimal_params, ci.get('optimal_params'), '.3g')} "
                     f"| {f.optimal_tokens:.3g} |")
    notes = [f"† {_label(f)}: {f.note}" for f in fits if not f.from_fit]
    unstable = [f"{_label(f)}: {100 * (1 - f.bootstrap_from_fit):.0f} %" for f in fits
                if f.bootstrap_from_fit is not None and f.bootstrap_from_fit < 1]
    if notes:
        lines += [""] + notes
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
            lines.append(f"| {_label(f)}{edge} | {_cell(o['optimal_ppl'], ci.get('optimal_ppl'))} "
                         f"| {_cell(o['optimal_params'], ci.get('optimal_params'), '.3g')} | {o['optimal_tokens']:.3g} |")
        if any(f.approach3["at_edge"] for f in a3):
            lines += ["", "‡ the optimum lies on the edge of the budget's sampled sizes."]
        if parametric:
            lines += ["", "| method | E | A | α | B | β | rmse (loss) | observations |", "|---|---|---|---|---|---|---|---|"]
            for m, p in parametric.items():
                lines.append(f"| {METHOD_NAMES.get(m, m)} | {p['E']:.3f} | {p['A']:.3g} | {p['alpha']:.3f} "
                             f"| {p['B']:.3g} | {p['beta']:.3f} | {p['rmse']:.4f} | {p['n_obs']} |")
    cmp = [f for f in fits if f.p_peer_lower]
    if cmp:
        others = [m for m in METHOD_ORDER if m != REFERENCE and any(m in f.p_peer_lower for f in cmp)]
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
                s = "—" if a2 is None else f"{a2:.2f}"
                if c.get("approach3") is not None:
                    s += f" / {c['approach3']:.2f}"
                cells.append(s)
            lines.append(f"| {_budget(f.budget)} | " + " | ".join(cells) + " |")
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
    p.add_argument("--window", type=int, default=5,
                   help="Approach 2 fits the WINDOW consecutive sizes centred on the best one (0: every size)")
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
                               window=args.window)
    out = Path(args.out or Path(args.root[0]) / "fit")
    out.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tasks):
        plot(fits, t, out / ("isoflop.png" if i == 0 else f"isoflop_{t}.png"), args.params)
    plot_optimum(fits, tasks[0], out / "optimum.png")
    table = markdown_table(fits, tasks, args.params, parametric)
    (out / "isoflop_table.md").write_text(table)
    (out / "isoflop_fit.json").write_text(json.dumps(
        {"params_kind": args.params, "eval_tasks": tasks, "roots": [str(r) for r in args.root],
         "approach2_window": args.window or None,
         "bootstrap": {"samples": args.bootstrap, "parametric_samples": min(args.bootstrap, args.bootstrap_parametric),
                       "seed": args.bootstrap_seed,
                       "resampling": "seeds of each point, with replacement"},
         "parametric": parametric, "fits": [dataclasses.asdict(f) for f in fits]}, indent=1))
    print(table)
    print(f"wrote {out}/isoflop.png, optimum.png, isoflop_table.md, isoflop_fit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
