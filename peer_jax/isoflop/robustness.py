"""How much each compute-optimal loss, and each verdict, moves with the choices of the fit.

The bootstrap (`peer_jax.isoflop.bootstrap`) measures seed noise for one set of fit choices.
A referee also asks how far the answer moves when a reasonable choice is made differently.
`robustness` refits every curve under these variants and reports, per method and budget, the
compute-optimal loss of the primary eval set under each, and their range:

* ``a2_window3``, ``a2_window5``, ``a2_all``: Approach 2 fitted to the 3 or 5 consecutive sizes
  around the best one, or to every size;
* ``a2_drop_<point>``: Approach 2 (the main window) with one size left out, for each size of
  the curve while at least 3 remain (leave-one-size-out);
* ``a2_max4_epochs``: Approach 2 (the main window) on the sizes that train for at most 4
  epochs (Muennighoff et al.: up to about 4, a repeated token is worth almost a new one), so a
  verdict can be bounded to points whose data is not much repeated. Given when `unique_tokens`
  is known (the main fit itself when every size qualifies; without an optimum when fewer than 3
  do);
* ``a3``: Approach 3, one L(N, D) per method (its own irreducible E);
* ``a3_shared_E``: Approach 3 with one E for all methods (fitted jointly; A, α, B, β stay per
  method). E is the loss of an infinite model on infinite data, a property of the data, so a
  method-specific E lets the fit trade E against the other terms;
* ``a3_data_constrained``: Approach 3 with D replaced by the effective data D′ of Muennighoff
  et al. (2023, eq. 5): U + U·R*·(1 − e^(−R/R*)), where U is the unique tokens of one epoch
  (`unique_tokens`), R = D/U − 1 the repeated epochs and R* = 15.4 their fitted decay
  constant (not refitted here: a mini grid has too few epochs to pin it). Given only when
  `unique_tokens` is known.

A variant **without an optimum** (an Approach 2 fit whose vertex falls back to the best
observed point: too few sizes, non-convex, or the vertex outside its sizes; an Approach 3
minimum on an end of the budget's sampled sizes) gives no measured optimum: it is listed
(`without_optimum`) and left out of the ranges, which are over the variants that have one.

A verdict is the difference of two methods' optimum losses at one budget (PEER minus the
other). Its range is over the variants both methods have, each side with an optimum; the
verdict holds at the strength of that range (e.g. "lower under every fit choice" only when the
whole range is below 0), and says how many fit choices it left out.

Next to it, each verdict is refitted on **each seed alone** (`per_seed`: PEER's and the other
method's curves as run under one sweep root, the main Approach 2 fit, for a seed that ran every
size of both curves):
the bootstrap resamples seeds per point, as if a seed's offset were independent across sizes;
one seed's curves fitted together keep that seed's offsets together.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from peer_jax.isoflop.fit import (HUBER_DELTA, METHOD_ORDER, REFERENCE, _parametric_jac, _parametric_loss, approach3,
                                  approach3_fittable, as_list, fit_group, fit_parametric, flops_per_token_fn)
from peer_jax.isoflop.grids import budget_tag

MUENNIGHOFF_R_STAR = 15.4
MAX_EPOCHS = 4.0


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


def _optima(groups: dict, method: str, x, d_of=None) -> dict[float, tuple[float, bool]]:
    """{budget: (optimum loss, on an end of the sampled sizes)} of L(N, D) with raw solution x;
    `d_of` maps tokens to the D the fit saw (D′ for the data-constrained variant)."""
    pts = [p for (m, _), ps in groups.items() if m == method for p in ps]
    fn = flops_per_token_fn(pts)
    out = {}
    for (m, budget), ps in groups.items():
        if m != method:
            continue
        sizes = [p["params"] for p in ps]
        log_n = np.linspace(math.log(min(sizes)), math.log(max(sizes)), 400)
        d = budget / fn(np.exp(log_n))
        curve = _parametric_loss(np.asarray(x), log_n, np.log(d_of(d) if d_of else d))
        i = int(np.argmin(curve))
        out[budget] = (float(np.exp(curve[i])), i in (0, len(log_n) - 1))
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


def seed_curve(pts: list[dict], root: str) -> list[dict]:
    """The points of one curve as run under one sweep root (one seed): each loss list cut to
    that root's value; points the root lacks are left out. Points without `roots` (synthetic
    groups) give none."""
    out = []
    for p in pts:
        roots = p.get("roots") or []
        if root in roots:
            i = roots.index(root)
            out.append({**p, "loss": {t: [as_list(v)[i]] for t, v in p["loss"].items()}, "roots": [root]})
    return out


def _a2_name(window: int | None) -> str:
    return f"a2_window{window}" if window else "a2_all"


def robustness(groups: dict, tasks: list[str], params_kind: str, unique_tokens: float | None = None,
               window: int | None = 5) -> dict:
    """{"curves": {"method@budget": {"variants": {name: loss}, "without_optimum": [names], "range": [lo, hi]}},
    "verdicts": {"peer-vs-<method>@budget": {"variants": {name: PEER − other}, "without_optimum": [names],
    "range": [lo, hi]}}, "shared_E": E} on the primary eval set (tasks[0]), losses in nats; a range
    is None when no variant has an optimum. `window`: the main fit's (`report` passes
    --window): leave-one-size-out and the ≤ 4-epoch variant refit with it."""
    primary = tasks[0]
    main = _a2_name(window)
    curves: dict[tuple[str, float], dict[str, float]] = {k: {} for k in groups}
    no_opt: dict[tuple[str, float], set[str]] = {k: set() for k in groups}

    def put(key, name, loss, has_optimum):
        curves[key][name] = loss
        if not has_optimum:
            no_opt[key].add(name)

    for key, pts in groups.items():
        for w in sorted({3, 5, 0, window or 0}, key=lambda v: v or 99):  # 0: every size
            f = fit_group(key[0], key[1], pts, tasks, params_kind, w or None)
            put(key, _a2_name(w), f.optimal_loss[primary], f.from_fit)
        if unique_tokens:  # every curve gets the variant, so no verdict loses it for want of a partner
            fresh = [p for p in pts if p["tokens"] <= MAX_EPOCHS * unique_tokens]
            if len(fresh) >= 3:  # with every size fresh, the main fit itself
                f = fit_group(key[0], key[1], fresh, tasks, params_kind, window)
                put(key, "a2_max4_epochs", f.optimal_loss[primary], f.from_fit)
            else:
                put(key, "a2_max4_epochs", None, False)
        if len(pts) > 3:
            for p in pts:
                rest = [q for q in pts if q is not p]
                f = fit_group(key[0], key[1], rest, tasks, params_kind, window)
                put(key, f"a2_drop_{p['name']}", f.optimal_loss[primary], f.from_fit)
    methods = sorted({m for m, _ in groups})
    per_method = {}
    for m in methods:
        if not approach3_fittable(groups, primary, m):
            continue
        fitted, optima = approach3(groups, primary, m)
        per_method[m] = fitted
        for b, o in optima.items():
            put((m, b), "a3", o["optimal_loss"], not o["at_edge"])
        if unique_tokens:
            n, d, y = _observations(groups, primary, m)
            dc = fit_parametric(n, effective_tokens(d, unique_tokens), y)
            for b, (v, edge) in _optima(groups, m, dc["x"], lambda t: effective_tokens(t, unique_tokens)).items():
                put((m, b), "a3_data_constrained", v, not edge)
    shared_e = None
    if len(per_method) > 1:
        shared_e, xs = shared_e_fit(groups, primary, per_method)
        for m, x in xs.items():
            for b, (v, edge) in _optima(groups, m, x).items():
                put((m, b), "a3_shared_E", v, not edge)

    order = {m: i for i, m in enumerate(METHOD_ORDER)}

    def summary(variants: dict[str, float], without: set[str]) -> dict:
        vals = [v for k, v in variants.items() if v is not None and np.isfinite(v) and k not in without]
        return {"variants": variants, "without_optimum": sorted(without),
                "range": [min(vals), max(vals)] if vals else None}

    out_curves = {f"{m}@{budget_tag(b)}": summary(v, no_opt[(m, b)])
                  for (m, b), v in sorted(curves.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99)))}
    verdicts = {}
    for (m, b), ref in sorted(curves.items(), key=lambda kv: kv[0][1]):
        if m != REFERENCE:
            continue
        for (o, b2), other in sorted(curves.items(), key=lambda kv: order.get(kv[0][0], 99)):
            if b2 != b or o == REFERENCE:
                continue
            ref_no, other_no = no_opt[(m, b)], no_opt[(o, b)]
            # leave-one-size-out variants drop different points on each side: pair them as the
            # range of either side's variants against the other's main fit
            diffs = {k: None if ref[k] is None or other[k] is None else ref[k] - other[k]
                     for k in ref if k in other and not k.startswith("a2_drop_")}
            without = {k for k in diffs if k in ref_no or k in other_no}
            for k, v in ref.items():
                if k.startswith("a2_drop_") and main in other:
                    diffs[f"{k} (PEER)"] = v - other[main]
                    if k in ref_no or main in other_no:
                        without.add(f"{k} (PEER)")
            for k, v in other.items():
                if k.startswith("a2_drop_") and main in ref:
                    diffs[f"{k} ({o})"] = ref[main] - v
                    if k in other_no or main in ref_no:
                        without.add(f"{k} ({o})")
            v = summary(diffs, without)
            # each seed's curves alone (main fit): is the sign the same in every seed?
            per_seed = {}
            roots = sorted({r for x in (m, o) for p in groups[(x, b)] for r in p.get("roots", [])})
            for root in roots if len(roots) > 1 else []:  # one seed: the main fit itself
                pair = [seed_curve(groups[(x, b)], root) for x in (m, o)]
                if [len(c) for c in pair] != [len(groups[(x, b)]) for x in (m, o)]:
                    continue  # a seed that missed a size would be fitted over another range of sizes
                f_ref, f_other = (fit_group(x, b, c, tasks, params_kind, window) for x, c in zip((m, o), pair))
                per_seed[Path(root).name] = (f_ref.optimal_loss[primary] - f_other.optimal_loss[primary]
                                             if f_ref.from_fit and f_other.from_fit else None)
            if per_seed:
                v["per_seed"] = per_seed
            verdicts[f"{REFERENCE}-vs-{o}@{budget_tag(b)}"] = v
    return {"primary": primary, "unique_tokens": unique_tokens, "muennighoff_r_star": MUENNIGHOFF_R_STAR,
            "window": window, "shared_E": shared_e, "curves": out_curves, "verdicts": verdicts}


def verdicts_held(rob: dict, fits, method_names: dict[str, str]) -> dict[str, str]:
    """{verdict key: what holds under every fit choice}: "PEER lower", "PEER higher", "no: the
    sign depends on the choice", or "not stated: …" when a curve's main Approach 2 optimum is its
    best observed point (too few sizes, non-convex, or the minimum at an end of the sampled
    sizes; read from `fits`, the main fits): such a curve has no measured optimum to compare.
    Fit choices without an optimum on either side are left out of the range, and the verdict
    says how many; "not stated: no fit choice has an optimum on both sides" when none is left."""
    edge = {f"{f.method}@{budget_tag(f.budget)}" for f in fits if not f.from_fit}
    held = {}
    for k, v in rob["verdicts"].items():
        o, b = k.split("-vs-")[1].split("@")
        r = v["range"]
        blocked = [f"{method_names.get(m, m)} {b}" for m in (REFERENCE, o) if f"{m}@{b}" in edge]
        if blocked:
            held[k] = (f"not stated: {' and '.join(blocked)} {'has' if len(blocked) == 1 else 'have'} no optimum "
                       f"inside {'its' if len(blocked) == 1 else 'their'} sizes (†)")
            continue
        if r is None:
            held[k] = "not stated: no fit choice has an optimum on both sides"
            continue
        held[k] = "PEER lower" if r[1] < 0 else ("PEER higher" if r[0] > 0 else "no: the sign depends on the choice")
        left_out = len(v.get("without_optimum", ()))
        if left_out:
            held[k] += f" ({left_out} of {len(v['variants'])} fit choices without an optimum left out)"
    return held


def _families(rob: dict) -> str:
    """The fit variants present in `rob`, in words (Approach 3 needs 2 budgets of 3 sizes per method)."""
    names = {k for v in rob["curves"].values() for k in v["variants"]}
    windows = sorted(int(n[len("a2_window"):]) for n in names if n.startswith("a2_window"))
    out = [f"Approach 2 windows {' / '.join(map(str, windows))}"] if windows else []
    out += [text for test, text in ((lambda n: n == "a2_all", "all sizes"),
                                    (lambda n: n.startswith("a2_drop_"), "leave-one-size-out"),
                                    (lambda n: n == "a2_max4_epochs", f"only sizes of ≤ {MAX_EPOCHS:g} epochs"),
                                    (lambda n: n == "a3", "Approach 3 with its own E"),
                                    (lambda n: n == "a3_shared_E", "with one shared E"),
                                    (lambda n: n == "a3_data_constrained", "with data-constrained D′"))
            if any(map(test, names))]
    return ", ".join(out)


def _range(r) -> str:
    return "—" if r is None else f"{r[0]:.4f} – {r[1]:.4f}"


def markdown(rob: dict, fits, method_names: dict[str, str]) -> str:
    """The verdict ranges next to each curve's bootstrap interval (Approach 2, primary set)."""
    ci = {f"{f.method}@{budget_tag(f.budget)}": ((f.ci95 or {}).get("optimal_loss") or {}).get(rob["primary"]) for f in fits}
    lines = [f"**Robustness** (`{rob['primary']}` loss in nats at each optimum; range over the fit variants of "
             f"`peer_jax/isoflop/robustness.py` that this data allows: {_families(rob)}; a variant without an "
             "optimum inside its sizes is left out of the range and counted in the last column):", "",
             "| curve | range over fit choices | bootstrap 95 % (Approach 2) | fit choices without an optimum |",
             "|---|---|---|---|"]
    for k, v in rob["curves"].items():
        m, b = k.split("@")
        c = ci.get(k)
        without = v.get("without_optimum", [])
        lines.append(f"| {method_names.get(m, m)} {b} | {_range(v['range'])} "
                     f"| {'' if c is None else f'{c[0]:.4f} – {c[1]:.4f}'} "
                     f"| {len(without)} of {len(v['variants'])}{': ' + ', '.join(without) if without else ''} |")
    seeds = any(v.get("per_seed") for v in rob["verdicts"].values())
    lines += ["", "| verdict (PEER − other, nats) | range over fit choices | holds under every choice |"
              + (" each seed's curves alone (main fit) |" if seeds else ""), "|---|---|---|" + ("---|" if seeds else "")]
    held = verdicts_held(rob, fits, method_names)
    for k, v in rob["verdicts"].items():
        o, b = k.split("-vs-")[1].split("@")
        r = v["range"]
        cell = "—" if r is None else f"{r[0]:+.4f} – {r[1]:+.4f}"
        per = ", ".join(f"{s_} {'no optimum' if d is None else f'{d:+.4f}'}" for s_, d in v.get("per_seed", {}).items())
        lines.append(f"| PEER vs {method_names.get(o, o)} {b} | {cell} | {held[k]} |" + (f" {per} |" if seeds else ""))
    if seeds:
        lines += ["", "Each seed alone: the main Approach 2 fit of PEER's and the other method's curves as run under "
                  "one seed root (a seed that ran every size of both curves), PEER − other; \"no optimum\" "
                  "where either curve's vertex falls back to its best observed point. The seeds differ in init and "
                  "data order; a sign that holds in each does not rest on one seed's draw."]
    return "\n".join(lines) + "\n"
