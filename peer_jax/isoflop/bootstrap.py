"""Bootstrap intervals over seeds for the isoFLOP fit (`peer_jax.isoflop.fit`).

Bootstrap: in each of `--bootstrap` samples (default 1000), every point's seeds are resampled
with replacement (as many draws as it has seeds) and the estimates are recomputed with exactly
the rules of `peer_jax.isoflop.fit` (fallbacks included): Approach 2 in every sample, Approach 3 in the first
`--bootstrap_parametric` (default 200; each refit starts from the full-data solution and one
other point). `ci95` is the 2.5–97.5 % percentile interval.
Intervals and comparisons are given only for curves (method × budget) whose every point in the
fitted window was run with two or more seeds; any other curve gets none (null), whatever other
curves have: a point of one seed never moves in the resampling, so its interval would read as
more certain than the runs are (`--partial_replicates` restores the older rule, intervals for
a curve with any replicated point, which the mini2 study's committed fit used). PEER is compared
with every other method at every budget: the fraction of bootstrap samples in which PEER's
compute-optimal loss is lower (samples of different methods are independent
runs, so sample i of one is paired with sample i of the other). Two seeds give crude intervals
(each point's mean takes only 3 values); they measure seed noise of the runs, not the choice
of shapes or budgets.
"""

from __future__ import annotations

import math

import numpy as np

from peer_jax.isoflop.fit import (METHOD_ORDER, REFERENCE, Fit, approach3, approach3_fittable, as_list,
                                  fit_group)


def resample_seeds(groups: dict, rng: np.random.Generator) -> dict:
    """A copy of `groups` in which every point's seeds are drawn with replacement (the same
    draw for every eval task: one seed is one run)."""
    out = {}
    for key, pts in groups.items():
        new = []
        for p in pts:
            k = max(len(as_list(v)) for v in p["loss"].values())
            idx = rng.integers(0, k, size=k)
            new.append({**p, "loss": {t: [as_list(v)[i] for i in idx] if len(as_list(v)) == k else v
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
    # median ln N and ln D of each method's points: where the second start matches the solution
    medians = {m: (float(np.median([math.log(p["params"]) for (mm, _), ps in groups.items() if mm == m for p in ps])),
                   float(np.median([math.log(p["tokens"]) for (mm, _), ps in groups.items() if mm == m for p in ps])))
               for m in methods}
    for i in range(num_samples):
        g = resample_seeds(groups, rng)
        for key, pts in g.items():
            f = fit_group(key[0], key[1], pts, tasks, params_kind, window)
            out[key]["approach2"].append({"optimal_params": f.optimal_params, "optimal_tokens": f.optimal_tokens,
                                          "optimal_loss": f.optimal_loss, "from_fit": f.from_fit})
        if i >= parametric:
            continue
        for m in methods:
            if parametric_starts is not None and m not in parametric_starts:
                continue  # no full-data Approach 3 fit (too few observations): no interval to give
            starts = None
            if parametric_starts and m in parametric_starts:
                # the full-data solution, and one with half its E and both exponents at 0.5 (each
                # term rescaled to its value at the median size and data) against local minima
                x, (mn, md) = parametric_starts[m], medians[m]
                starts = [x, (0.5 * x[0], x[1] + (0.5 - x[2]) * mn, 0.5, x[3] + (0.5 - x[4]) * md, 0.5)]
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



def fit_all(groups, tasks: list[str], params_kind: str, bootstrap_samples: int = 0, seed: int = 0,
            parametric: bool = True, parametric_samples: int | None = None,
            window: int | None = None, partial_replicates: bool = False) -> tuple[list[Fit], dict]:
    """Approach 2 per (method, budget) and Approach 3 per method, with bootstrap intervals and
    PEER's comparisons. Returns (fits, {method: parametric fit with its ci95}).
    `partial_replicates`: give a curve intervals as soon as one of its points has 2 seeds (the
    rule of the mini2 study's committed fit; such intervals understate the seed noise)."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = sorted(groups, key=lambda k: (k[1], order.get(k[0], 99), k[0]))
    fits = [fit_group(m, b, groups[(m, b)], tasks, params_kind, window) for m, b in keys]
    replicated = (lambda f: f.seeds >= 2) if partial_replicates else (lambda f: f.window_seeds >= 2)
    by_key = {(f.method, f.budget): f for f in fits}
    primary = tasks[0]
    params: dict[str, dict] = {}
    if parametric:
        for m in sorted({m for m, _ in groups}, key=lambda m: order.get(m, 99)):
            if not approach3_fittable(groups, primary, m):
                continue
            fitted, optima = approach3(groups, primary, m)
            params[m] = fitted
            for b, opt in optima.items():
                by_key[(m, b)].approach3 = dict(opt)
    if bootstrap_samples <= 0 or not any(map(replicated, fits)):
        return fits, params
    starts = {m: tuple(p["x"]) for m, p in params.items()}
    n3 = bootstrap_samples if parametric_samples is None else min(parametric_samples, bootstrap_samples)
    samples = bootstrap(groups, tasks, params_kind, bootstrap_samples, seed, parametric=n3 if params else 0,
                        parametric_starts=starts, window=window)
    for f in fits:
        if not replicated(f):  # a window point without a replicate: resampling cannot move it
            continue
        s = samples[(f.method, f.budget)]
        f.ci95 = intervals_approach2(s["approach2"], tasks)
        f.bootstrap_from_fit = float(np.mean([x["from_fit"] for x in s["approach2"]]))
        if f.approach3 is not None:
            ok = [x for x in s["approach3"] if x is not None]
            f.approach3["ci95"] = intervals_approach3(ok)
            f.approach3["bootstrap_at_edge"] = float(np.mean([x["at_edge"] for x in ok])) if ok else None
    for m in params:  # intervals of the fitted constants themselves are not kept: E, A, α trade off
        # one refit per sample gives every budget's optimum: count the samples, not the budgets
        first = next(key for key in samples if key[0] == m)
        params[m]["bootstrap_failures"] = sum(x is None for x in samples[first]["approach3"])
    for f in fits:
        if f.method != REFERENCE or not replicated(f):
            continue
        ref = samples[(f.method, f.budget)]
        f.p_peer_lower = {}
        for g in fits:
            if g.budget != f.budget or g.method == REFERENCE or not replicated(g):
                continue
            other = samples[(g.method, g.budget)]
            cmp = {"approach2": {t: p_lower([x["optimal_loss"].get(t) for x in ref["approach2"]],
                                            [x["optimal_loss"].get(t) for x in other["approach2"]]) for t in tasks}}
            if f.method in params and g.method in params:  # the same first samples of both
                cmp["approach3"] = p_lower([x and x["optimal_loss"] for x in ref["approach3"]],
                                           [x and x["optimal_loss"] for x in other["approach3"]])
            f.p_peer_lower[g.method] = cmp
    return fits, params
