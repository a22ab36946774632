"""How much each compute-optimal loss, and each verdict, moves with the choices of the fit.

The bootstrap (`peer_jax.isoflop.bootstrap`) measures seed noise for one set of fit choices.
A referee also asks how far the answer moves when a reasonable choice is made differently.
`robustness` refits every curve under these variants and reports, per method and budget, the
compute-optimal loss of the primary eval set under each, and their range:

* ``a2_window3``, ``a2_window5``, ``a2_all``: Approach 2 fitted to the 3 or 5 consecutive sizes
  around the best one, or to every size;
* ``a2_drop_<point>``: Approach 2 (window 5) with one size left out, for each size of the
  curve while at least 3 remain (leave-one-size-out);
* ``a3``: Approach 3, one L(N, D) per method (its own irreducible E);
* ``a3_shared_E``: Approach 3 with one E for all methods (fitted jointly; A, α, B, β stay per
  method). E is the loss of an infinite model on infinite data, a property of the data, so a
  method-specific E lets the fit trade E against the other terms;
* ``a3_data_constrained``: Approach 3 with D replaced by the effective data D′ of Muennighoff
  et al. (2023, eq. 5): U + U·R*·(1 − e^(−R/R*)), where U is the unique tokens of one epoch
  (`unique_tokens`), R = D/U − 1 the repeated epochs and R* = 15.4 their fitted decay
  constant (not refitted here: a mini grid has too few epochs to pin it). Given only when
  `unique_tokens` is known.

A verdict is the difference of two methods' optimum losses at one budget (PEER minus the
other). Its range is over the variants both methods have; the verdict holds at the strength
of that range (e.g. "lower under every fit choice" only when the whole range is below 0).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from peer_jax.isoflop.fit import (HUBER_DELTA, METHOD_ORDER, REFERENCE, _parametric_jac, _parametric_loss, approach3, as_list,
                                  fit_group, fit_parametric, flops_per_token_fn)
from peer_jax.isoflop.grids import budget_tag

MUENNIGHOFF_R_STAR = 15.4


def effective_tokens(d, unique_tokens: float):
    """Muennighoff et al.'s D′: tokens beyond the first epoch count with decaying worth."""
    d = np.asarray(d, np.float64)
    repeats = np.maximum(d / unique_tokens - 1.0, 0.0)
    return np.minimum(d, unique_tokens) + unique_tokens * MUENNIGHOFF_R_STAR * (1 - np.exp(-repeats / MUENNIGHOFF_R_STAR))


def _observations(groups: dict, primary: str, method: str):
    n, d, y = [], [], []
    for (m, _), ps in groups.items():
        if m == method:
            for p in ps:
                for v in as_list(p["loss"][primary]):
                    n.append(p["params"]), d.append(p["tokens"]), y.append(v)
    return np.asarray(n, np.float64), np.asarray(d, np.float64), np.asarray(y, np.float64)


def _optima(groups: dict, method: str, x, d_of=None) -> dict[float, float]:
    """{budget: optimum loss} of L(N, D) with raw solution x; `d_of` maps tokens to the D the
    fit saw (D′ for the data-constrained variant)."""
    pts = [p for (m, _), ps in groups.items() if m == method for p in ps]
    fn = flops_per_token_fn(pts)
    out = {}
    for (m, budget), ps in groups.items():
        if m != method:
            continue
        sizes = [p["params"] for p in ps]
        log_n = np.linspace(math.log(min(sizes)), math.log(max(sizes)), 400)
        d = budget / fn(np.exp(log_n))
        out[budget] = float(np.exp(_parametric_loss(np.asarray(x), log_n, np.log(d_of(d) if d_of else d))).min())
    return out


def shared_e_fit(groups: dict, primary: str, per_method: dict[str, dict]) -> tuple[float, dict[str, list[float]]]:
    """One E for all methods, (ln A, α, ln B, β) per method: Huber (δ = 1e-3) on ln L, started
    from the per-method fits with E at the smallest of their E's."""
    from scipy.optimize import least_squares

    methods = sorted(per_method)
    obs = {m: _observations(groups, primary, m) for m in methods}
    y_min = min(float(o[2].min()) for o in obs.values())

    def residuals(z):
        e, rest = z[0], z[1:].reshape(len(methods), 4)
        return np.concatenate([
            _parametric_loss(np.concatenate([[e], rest[i]]), np.log(obs[m][0]), np.log(obs[m][1])) - np.log(obs[m][2])
            for i, m in enumerate(methods)])

    def jac(z):
        e, rest = z[0], z[1:].reshape(len(methods), 4)
        blocks = []
        for i, m in enumerate(methods):
            j = _parametric_jac(np.concatenate([[e], rest[i]]), np.log(obs[m][0]), np.log(obs[m][1]))
            full = np.zeros((len(j), 1 + 4 * len(methods)))
            full[:, 0] = j[:, 0]
            full[:, 1 + 4 * i:5 + 4 * i] = j[:, 1:]
            blocks.append(full)
        return np.concatenate(blocks)

    lo = np.array([0.0] + [-30.0, 0.0, -30.0, 0.0] * len(methods))
    hi = np.array([y_min] + [60.0, 3.0, 60.0, 3.0] * len(methods))
    best = None
    for e0 in (min(p["E"] for p in per_method.values()), 0.5 * y_min):
        z0 = np.concatenate([[e0]] + [per_method[m]["x"][1:] for m in methods])
        z0 = np.clip(z0, lo + 1e-9, hi - 1e-9)
        with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = least_squares(residuals, z0, jac=jac, bounds=(lo, hi), loss="huber", f_scale=HUBER_DELTA,
                              x_scale="jac", max_nfev=4000)
        if np.isfinite(r.cost) and (best is None or r.cost < best.cost):
            best = r
    e = float(best.x[0])
    rest = best.x[1:].reshape(len(methods), 4)
    return e, {m: [e, *map(float, rest[i])] for i, m in enumerate(methods)}


def robustness(groups: dict, tasks: list[str], params_kind: str, unique_tokens: float | None = None) -> dict:
    """{"curves": {"method@budget": {"variants": {name: loss}, "range": [lo, hi]}},
    "verdicts": {"peer-vs-<method>@budget": {"variants": {name: PEER − other}, "range": [lo, hi]}},
    "shared_E": E} on the primary eval set (tasks[0]), losses in nats."""
    primary = tasks[0]
    curves: dict[tuple[str, float], dict[str, float]] = {k: {} for k in groups}
    for key, pts in groups.items():
        for name, window in (("a2_window3", 3), ("a2_window5", 5), ("a2_all", None)):
            curves[key][name] = fit_group(key[0], key[1], pts, tasks, params_kind, window).optimal_loss[primary]
        if len(pts) > 3:
            for p in pts:
                rest = [q for q in pts if q is not p]
                curves[key][f"a2_drop_{p['name']}"] = fit_group(key[0], key[1], rest, tasks, params_kind,
                                                               5).optimal_loss[primary]
    methods = sorted({m for m, _ in groups})
    per_method = {}
    for m in methods:
        if len(_observations(groups, primary, m)[2]) < 6:  # five parameters
            continue
        fitted, optima = approach3(groups, primary, m)
        per_method[m] = fitted
        for b, o in optima.items():
            curves[(m, b)]["a3"] = o["optimal_loss"]
        if unique_tokens:
            n, d, y = _observations(groups, primary, m)
            dc = fit_parametric(n, effective_tokens(d, unique_tokens), y)
            for b, v in _optima(groups, m, dc["x"], lambda t: effective_tokens(t, unique_tokens)).items():
                curves[(m, b)]["a3_data_constrained"] = v
    shared_e = None
    if len(per_method) > 1:
        shared_e, xs = shared_e_fit(groups, primary, per_method)
        for m, x in xs.items():
            for b, v in _optima(groups, m, x).items():
                curves[(m, b)]["a3_shared_E"] = v

    order = {m: i for i, m in enumerate(METHOD_ORDER)}

    def summary(variants: dict[str, float]) -> dict:
        vals = [v for v in variants.values() if np.isfinite(v)]
        return {"variants": variants, "range": [min(vals), max(vals)] if vals else None}

    out_curves = {f"{m}@{budget_tag(b)}": summary(v)
                  for (m, b), v in sorted(curves.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99)))}
    verdicts = {}
    for (m, b), ref in sorted(curves.items(), key=lambda kv: kv[0][1]):
        if m != REFERENCE:
            continue
        for (o, b2), other in sorted(curves.items(), key=lambda kv: order.get(kv[0][0], 99)):
            if b2 != b or o == REFERENCE:
                continue
            # leave-one-size-out variants drop different points on each side: pair them as the
            # range of either side's variants against the other's window-5 fit
            diffs = {k: ref[k] - other[k] for k in ref if k in other and not k.startswith("a2_drop_")}
            for k, v in ref.items():
                if k.startswith("a2_drop_") and "a2_window5" in other:
                    diffs[f"{k} (PEER)"] = v - other["a2_window5"]
            for k, v in other.items():
                if k.startswith("a2_drop_") and "a2_window5" in ref:
                    diffs[f"{k} ({o})"] = ref["a2_window5"] - v
            verdicts[f"{REFERENCE}-vs-{o}@{budget_tag(b)}"] = summary(diffs)
    return {"primary": primary, "unique_tokens": unique_tokens, "muennighoff_r_star": MUENNIGHOFF_R_STAR,
            "shared_E": shared_e, "curves": out_curves, "verdicts": verdicts}


def verdicts_held(rob: dict, fits, method_names: dict[str, str]) -> dict[str, str]:
    """{verdict key: what holds under every fit choice}: "PEER lower", "PEER higher", "no: the
    sign depends on the choice", or "not stated: …" when a curve's Approach 2 optimum is its best
    observed point (too few sizes, non-convex, or the minimum at an end of the sampled sizes):
    such a curve has no measured optimum to compare."""
    edge = {f"{f.method}@{budget_tag(f.budget)}" for f in fits if not f.from_fit}
    held = {}
    for k, v in rob["verdicts"].items():
        o, b = k.split("-vs-")[1].split("@")
        r = v["range"]
        blocked = [f"{method_names.get(m, m)} {b}" for m in (REFERENCE, o) if f"{m}@{b}" in edge]
        if blocked:
            held[k] = f"not stated: {', '.join(blocked)} has no optimum inside its sizes (†)"
        else:
            held[k] = "PEER lower" if r[1] < 0 else ("PEER higher" if r[0] > 0 else "no: the sign depends on the choice")
    return held


def markdown(rob: dict, fits, method_names: dict[str, str]) -> str:
    """The verdict ranges next to each curve's bootstrap interval (Approach 2, primary set)."""
    ci = {f"{f.method}@{budget_tag(f.budget)}": ((f.ci95 or {}).get("optimal_loss") or {}).get(rob["primary"]) for f in fits}
    lines = [f"**Robustness** (`{rob['primary']}` loss in nats at each optimum; range over the fit variants of "
             "`peer_jax/isoflop/robustness.py`: windows 3 / 5 / all, leave-one-size-out, Approach 3 with its own E, "
             "with one shared E" + (", with data-constrained D′" if rob["unique_tokens"] else "") + "):", "",
             "| curve | range over fit choices | bootstrap 95 % (Approach 2) |", "|---|---|---|"]
    for k, v in rob["curves"].items():
        m, b = k.split("@")
        r, c = v["range"], ci.get(k)
        lines.append(f"| {method_names.get(m, m)} {b} | {r[0]:.4f} – {r[1]:.4f} "
                     f"| {'' if c is None else f'{c[0]:.4f} – {c[1]:.4f}'} |")
    lines += ["", "| verdict (PEER − other, nats) | range over fit choices | holds under every choice |", "|---|---|---|"]
    held = verdicts_held(rob, fits, method_names)
    for k, v in rob["verdicts"].items():
        o, b = k.split("-vs-")[1].split("@")
        r = v["range"]
        lines.append(f"| PEER vs {method_names.get(o, o)} {b} | {r[0]:+.4f} – {r[1]:+.4f} | {held[k]} |")
    return "\n".join(lines) + "\n"
