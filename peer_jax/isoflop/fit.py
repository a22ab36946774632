"""isoFLOP curves: each method's compute-optimal model from finished runs, two ways.

Points are {name, params, tokens, flops_per_token, loss: {eval task: final eval loss, or a list
of them, one per seed}}; `peer_jax.isoflop.report.collect` reads them from sweep roots.

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

Parameters (the x axis): by default **active non-embedding parameters** (the parameters a token
uses: all dense weights, and for a sparse layer its router / query network / keys plus the
experts or memories a token is routed to, see `peer_jax.flops.param_counts`). Training FLOPs
per token are ≈ 6 × this number (+ attention), so at a fixed budget it is the quantity traded
against tokens, and dense and sparse models share one axis. Embeddings are left out as in
Kaplan et al. `--params total` or `--params non_embedding` fit against those counts instead.

Bootstrap intervals over seeds: `peer_jax.isoflop.bootstrap`; tables, outputs and the command
line (scripts/fit_isoflop.py): `peer_jax.isoflop.report`; figures: `peer_jax.isoflop.plots`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from peer_jax.isoflop.grids import budget_tag

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


def as_list(v) -> list[float]:
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
    window_seeds: int = 1  # fewest seeds of a point in the fitted window (bootstrap intervals need ≥ 2)
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
    mean = [{t: float(np.mean(as_list(v))) for t, v in p["loss"].items()} for p in points]
    best = min(range(len(points)), key=lambda i: mean[i][primary])
    sel = window_around(best, len(points), window)
    coeffs: dict[str, tuple | None] = {}
    for t in tasks:
        obs = [(as_list(points[i]["loss"][t]) if t in points[i]["loss"] else None) for i in sel]
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
    counts = [len(as_list(p["loss"][primary])) for p in points]
    return Fit(method, budget, params_kind, points, [points[i]["name"] for i in sel], coeffs, n_star, tokens, loss,
               {t: math.exp(v) for t, v in loss.items()}, from_fit, note, max(counts),
               min(counts[i] for i in sel))


# ----------------------------------------------------------------------------- Approach 3: L(N, D)

HUBER_DELTA = 1e-3
PARAMETRIC_NAMES = ("E", "A", "alpha", "B", "beta")  # the order of the raw solution x (A, B as logs)


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
    # A constant pinned to a bound (E = 0, an exponent at 0 or 3) means the data do not identify
    # it: the other constants absorb it, and only the fitted surface, not the constants, is read.
    tol = 1e-4 * (hi - lo)  # within 0.01 % of the allowed range
    at_bound = [name for name, v, l, h, t in zip(PARAMETRIC_NAMES, best.x, lo, hi, tol)
                if v - l <= t or h - v <= t]
    return {"E": e, "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta, "x": [float(v) for v in best.x],
            "rmse": float(np.sqrt(np.mean((pred - y) ** 2))), "n_obs": int(len(y)), "at_bound": at_bound}


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


def approach3_fittable(groups: dict, primary: str, method: str) -> bool:
    """Whether L(N, D) is identifiable from `method`'s points: at least 2 budgets with 3 sizes
    each (on one budget ln D is a function of ln N, so the N and D terms trade off freely) and
    6 observations (five parameters)."""
    pts = {b: ps for (m, b), ps in groups.items() if m == method}
    n_obs = sum(len(as_list(p["loss"].get(primary, []))) for ps in pts.values() for p in ps)
    return n_obs >= 6 and sum(len(ps) >= 3 for ps in pts.values()) >= 2


def approach3(groups: dict, primary: str, method: str, starts=None) -> tuple[dict, dict[float, dict]]:
    """Fits L(N, D) over all budgets of `method`; returns (fitted, {budget: optimum})."""
    pts = [p for (m, _), ps in groups.items() if m == method for p in ps]
    n, d, y = [], [], []
    for p in pts:
        for v in as_list(p["loss"][primary]):
            n.append(p["params"]), d.append(p["tokens"]), y.append(v)
    fitted = fit_parametric(n, d, y, starts)
    fn = flops_per_token_fn(pts)
    optima = {}
    for (m, budget), ps in groups.items():
        if m == method:
            sizes = [p["params"] for p in ps]
            optima[budget] = parametric_optimum(fitted, budget, fn, (min(sizes), max(sizes)))
    return fitted, optima




def label(f: Fit) -> str:
    """'PEER 6e18', as in the paper's Table 1."""
    return f"{METHOD_NAMES.get(f.method, f.method)} {budget_tag(f.budget)}"
