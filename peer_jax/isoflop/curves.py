"""Validation curves: eval loss against train loss over a run, for several runs in one figure.

    python -m peer_jax.isoflop.curves RUN_DIR [RUN_DIR ...] --out curves.png [--task kjv]

Reads each run's `metrics.jsonl`: the logged train `ce_loss` (the loss without auxiliary
terms) and the intermediate evals `eval_subset/<task>/loss` (a small fixed subset, every
`eval_every` steps), plus the final whole-split `eval/<task>/loss`. Left panel: both against
the step, train as a line, eval as markers; right panel: eval against the train loss at the
same step (the train loss is the mean of the logged values since the previous eval, so it is
the loss on the rows trained between two evals). A run whose points lie above the diagonal
generalises worse than it fits what it has seen; repeated data (several epochs) moves them up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read_curve(run_dir: Path, task: str) -> dict:
    """{"steps", "train" (mean ce_loss since the previous eval), "eval" (subset), "final"}."""
    train_steps, train, evals, final = [], [], [], None
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "ce_loss" in r:
            train_steps.append(r["step"]), train.append(r["ce_loss"])
        if f"eval_subset/{task}/loss" in r:
            evals.append((r["step"], r[f"eval_subset/{task}/loss"]))
        if f"eval/{task}/loss" in r:
            final = (r["step"], r[f"eval/{task}/loss"])
    train_steps, train = np.asarray(train_steps), np.asarray(train)
    steps, ev, tr = [], [], []
    prev = 0
    for s, v in evals:
        sel = (train_steps > prev) & (train_steps <= s)
        if sel.any():
            steps.append(s), ev.append(v), tr.append(float(train[sel].mean()))
        prev = s
    return {"train_steps": train_steps.tolist(), "train_all": train.tolist(), "steps": steps, "eval": ev,
            "train": tr, "final": final}


def plot(runs: dict[str, dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.3))
    lo, hi = np.inf, -np.inf
    for name, c in runs.items():
        line = a.plot(c["train_steps"], c["train_all"], lw=0.7, alpha=0.6, label=f"{name} train")[0]
        a.plot(c["steps"], c["eval"], "o", ms=3.5, color=line.get_color(), label=f"{name} eval (subset)")
        if c["final"]:
            a.plot(*c["final"], "*", ms=9, color=line.get_color())
        b.plot(c["train"], c["eval"], "o-", ms=3.5, lw=0.8, color=line.get_color(), label=name)
        if c["train"]:
            lo, hi = min(lo, *c["train"], *c["eval"]), max(hi, *c["train"], *c["eval"])
    a.set(xlabel="step", ylabel=f"loss (nats), {task}", yscale="log")
    a.legend(fontsize=6)
    if np.isfinite(lo):
        b.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    b.set(xlabel="train loss since the previous eval", ylabel=f"eval loss ({task} subset)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG to write (a JSON of the curves is written beside it)")
    p.add_argument("--task", default="kjv")
    args = p.parse_args(argv)
    runs = {}
    for r in args.runs:
        path = Path(r)
        if not (path / "metrics.jsonl").exists():
            p.error(f"{path}: no metrics.jsonl (not a run directory)")
        runs[f"{path.parent.name}/{path.name}"] = read_curve(path, args.task)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, args.task, out)
    out.with_suffix(".json").write_text(json.dumps(
        {k: {kk: v[kk] for kk in ("steps", "train", "eval", "final")} for k, v in runs.items()}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
