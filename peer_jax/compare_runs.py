"""Table of finished runs: parameters, active parameters per token, step time, eval perplexity
(or, with `--metric loss`, eval loss in nats per token: the figure the isoFLOP fits read).

Runs with PEER/PKM layers (or MoE) also get their eval expert statistics: usage (% of experts
given any router mass over the eval set) and unevenness (KL of the mass to uniform), one
column pair per eval task and sparse layer.

    python scripts/compare_runs.py runs/tiny_cpu runs/tiny_cpu_moe runs/tiny_cpu_pkm runs/tiny_cpu_peer

Each run directory must hold operative_config.gin, metrics.jsonl and result.json (written by
`python -m peer_jax.train`). Runs whose `host` entries (result.json, peer_jax/host.py) differ
from the first run's in what decides the bits (CPU, XLA:CPU ISA or pin, threads, versions) are
listed below the table: such runs of one point need not agree bit for bit
(docs/reproducibility.md). The model is rebuilt abstractly from the operative config to count
parameters (`peer_jax.flops.param_counts`); step time is the median of the logged train rows
after the first (which includes compilation).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import gin
from flax import nnx

from peer_jax import flops, gin_utils, host
from peer_jax.training.config import TrainConfig


def describe(run: Path) -> dict:
    gin_utils.parse([str(run / "operative_config.gin")], [])
    try:
        cfg = gin.get_configurable(TrainConfig)()
        model = nnx.eval_shape(lambda: cfg.model(384, rngs=nnx.Rngs(0)))
        micro = cfg.batch_size // cfg.grad_accum_steps
        counts = flops.param_counts(model, cfg.seq_len, micro)
        train_flops = flops.train_flops_per_token(model, cfg.seq_len, micro)
    finally:
        gin.clear_config()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
    result = json.loads((run / "result.json").read_text())
    return {
        "run": run.name, "params": counts["total"], "active_non_embedding": counts["active_non_embedding"],
        "train_flops_per_token": train_flops, "steps": result["step"],
        "step_time_s": statistics.median(step_times) if step_times else float("nan"),
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r),
        **{k: v for k, v in result.items()
           if k.startswith("eval/") and k.endswith(("/ppl", "/loss", "/usage", "/unevenness"))},
        "host": result.get("host"),
    }


def host_notes(rows: list[dict]) -> list[str]:
    """One line per run whose host differs from the first run's in what decides the bits."""
    first = rows[0]
    notes = []
    for r in rows[1:]:
        diff = host.differences(first.get("host"), r.get("host"))
        if diff:
            notes.append(f"{r['run']} vs {first['run']}: different or unknown hosts ({'; '.join(diff)}); expect "
                         "drift, not equal bits (docs/reproducibility.md).")
    return notes


def _stat(value: float | None, key: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if key.endswith("/usage") else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--metric", choices=("ppl", "loss"), default="ppl",
                   help="eval perplexity, or eval loss in nats per token (4 decimals)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    a = p.parse_args(argv)
    needed = ("operative_config.gin", "metrics.jsonl", "result.json")
    missing = [f"{r} (no {', '.join(n for n in needed if not (Path(r) / n).is_file())})" for r in a.runs
               if not all((Path(r) / n).is_file() for n in needed)]
    if missing:
        p.error("not a finished run folder: " + ", ".join(missing) + ". Pass the folders of finished runs, e.g. "
                "RESULTS/seed0/*_h? rather than RESULTS/seed0/* (which also matches sweep.json).")
    rows = [describe(Path(r)) for r in a.runs]
    names = [r["run"] for r in rows]
    for r, path in zip(rows, a.runs):  # one point from several sweeps (seeds, LRs): name the sweep too
        if names.count(r["run"]) > 1:
            r["run"] = f"{Path(path).resolve().parent.name}/{r['run']}"
    metric_keys = sorted({k for r in rows for k in r if k.endswith(f"/{a.metric}")})
    stat_keys = sorted({k for r in rows for k in r if k.endswith(("/usage", "/unevenness"))},
                       key=lambda k: (k.rpartition("/")[0], k.endswith("/unevenness")))  # usage first
    head = ["run", "params", "active non-emb", "train FLOPs/token", "steps", "step s", "tokens/s", *metric_keys,
            *(k.replace("/usage", "/usage %") for k in stat_keys)]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["run"], f"{r['params'] / 1e6:.2f}M", f"{r['active_non_embedding'] / 1e6:.3f}M",
                 f"{r['train_flops_per_token'] / 1e6:.2f}M", str(r["steps"]), f"{r['step_time_s']:.3f}",
                 f"{r['tokens_per_sec']:.0f}", *(f"{r.get(k, float('nan')):.{3 if a.metric == 'ppl' else 4}f}" for k in metric_keys),
                 *(_stat(r.get(k), k) for k in stat_keys)]
        print("| " + " | ".join(cells) + " |")
    for note in host_notes(rows):
        print(note)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
