"""Figures of the isoFLOP fit: the curves of one eval set, and the optimum against budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peer_jax.isoflop.fit import METHOD_NAMES, METHOD_ORDER, Fit, as_list, label

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
        obs = [np.exp(as_list(p["loss"][task])) for p in pts]
        ys = np.array([np.exp(np.mean(np.log(o))) for o in obs])
        yerr = np.array([[y - o.min() for y, o in zip(ys, obs)], [o.max() - y for y, o in zip(ys, obs)]])
        line = ax.errorbar(xs, ys, yerr=yerr if f.seeds > 1 else None, fmt="o", color=color, ms=3.5,
                           capsize=2, lw=0.8)[0]
        color = line.get_color()
        if f.coeffs.get(task) is not None:  # drawn over the sizes it was fitted to
            fitted = [p["params"] for p in pts if p["name"] in f.fit_points]
            grid = np.linspace(np.log(min(fitted)), np.log(max(fitted)), 100)
            a, b, c = f.coeffs[task]
            ax.plot(np.exp(grid), np.exp(a * grid**2 + b * grid + c), ls, color=color, label=label(f), lw=1.2)
        else:
            ax.plot(xs, ys, ls, color=color, label=label(f), lw=1.2)
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
