"""Which XLA:CPU settings change the bits of a training run? (docs/reproducibility.md)

  python benchmarks/xla_cpu_bits.py                       # ~40 minutes on 2 busy CPU cores
  python benchmarks/xla_cpu_bits.py --models peer --only 'AVX2|uncapped$'

Each variant is one `python -m peer_jax.train` run of a tiny model (configs/runs/tiny_cpu_peer.gin
and configs/runs/tiny_cpu.gin, --steps steps, loss logged at every step, one small eval at the
end) in a fresh process, with one setting changed against `uncapped` (XLA_FLAGS from the
environment only, both cores, the default allocator):

* ``cap=<ISA>``   ``--xla_cpu_max_isa=<ISA>`` for every level XLA:CPU accepts;
* ``1 thread``    the process limited to one core (``taskset -c 0``): XLA:CPU sizes its intra-op
                  pool from the CPUs the process may run on (1 pool thread instead of 2);
* ``eigen_st``    ``--xla_cpu_multi_thread_eigen=false``;
* ``no_ynn``      ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK library fusions: dots
                  run in XLA's Eigen runtime instead);
* ``malloc=system``  ``PEER_JAX_MALLOC=system`` (glibc's default allocator, peer_jax/runtime.py);
* ``pin=<ISA>/<n>t``  ``config.TrainConfig.xla_cpu_pin=<ISA>`` and ``xla_cpu_threads=<n>``
                  (peer_jax/host.py), against ``uncapped``, again, with the other allocator, and
                  with one thread on a process given both cores and given one core (``taskset``):
                  the stand-in for hosts with different core counts.

For every variant: whether the per-step train losses, gradient norms, parameter norms and eval
losses equal the reference's bit for bit, the first step whose loss differs and the largest
loss difference. Writes --out. The committed results ran as two commands (the second after
the pin existed): `--only '^(?!pin)' --out benchmarks/results/xla_cpu_bits_knobs.json` and
`--only '^uncapped$|^pin' --out benchmarks/results/xla_cpu_bits_pinned.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = {"peer": "configs/runs/tiny_cpu_peer.gin", "dense": "configs/runs/tiny_cpu.gin"}
ISAS = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AMX_FP16")
PIN = "config.TrainConfig.xla_cpu_pin"
THREADS = "config.TrainConfig.xla_cpu_threads"


def variants(pin: str, threads: int) -> list[dict]:
    """Each: name, the variant it is compared with (None: a reference), and what it changes:
    XLA_FLAGS added (`flags`), gin bindings (`gin`), environment (`env`), `taskset -c` CPUs (`cpus`)."""
    v = [dict(name="uncapped", ref=None), dict(name="uncapped again", ref="uncapped")]
    v += [dict(name=f"cap={isa}", ref="uncapped", flags=f"--xla_cpu_max_isa={isa}") for isa in ISAS]
    v += [dict(name="1 thread", ref="uncapped", cpus="0"),
          dict(name="eigen_st", ref="uncapped", flags="--xla_cpu_multi_thread_eigen=false"),
          dict(name="no_ynn", ref="uncapped", flags="--xla_cpu_experimental_ynn_fusion_type="),
          dict(name="malloc=system", ref="uncapped", env={"PEER_JAX_MALLOC": "system"})]
    pinned = f"pin={pin}/{threads}t"
    bind = [f'--gin.{PIN}="{pin}"', f"--gin.{THREADS}={threads}"]
    bind1 = [f'--gin.{PIN}="{pin}"', f"--gin.{THREADS}=1"]
    v += [dict(name=pinned, ref="uncapped", gin=bind),
          dict(name=f"{pinned} again", ref=pinned, gin=bind),
          dict(name=f"{pinned}, malloc=system", ref=pinned, gin=bind, env={"PEER_JAX_MALLOC": "system"}),
          dict(name=f"pin={pin}/1t", ref=pinned, gin=bind1),
          # a host with one core, against one with more: the same pinned run
          dict(name=f"pin={pin}/1t on 1 core", ref=f"pin={pin}/1t", gin=bind1, cpus="0")]
    return v


def run_one(gin_file: str, variant: dict, steps: int, workdir: Path, all_step_times: bool = False) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="3", **variant.get("env", {}))
    if variant.get("flags"):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {variant['flags']}".strip()
    cmd = [sys.executable, "-m", "peer_jax.train", f"--gin_file={gin_file}", f"--workdir={workdir}",
           f"--gin.config.TrainConfig.num_steps={steps}", "--gin.config.TrainConfig.log_every=1",
           f"--gin.config.TrainConfig.eval_every={steps}", "--gin.config.TrainConfig.eval_batches=2",
           f"--gin.config.TrainConfig.checkpoint_every={steps}", "--gin.config.TrainConfig.progress_bar=False",
           "--gin.config.TrainConfig.tensorboard=False", *variant.get("gin", [])]
    if variant.get("cpus"):
        cmd = ["taskset", "-c", variant["cpus"], *cmd]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{variant['name']}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = {k: v for r in rows for k, v in r.items() if re.fullmatch(r"eval/[^/]+/loss", k)}
    compile_report = json.loads((workdir / "compile_report.json").read_text())
    return {"loss": [r["loss"] for r in train], "grad_norm": [r["grad_norm"] for r in train],
            "param_norm": [r["param_norm"] for r in train], "eval": evals, "wall_s": wall,
            "step_s": sorted(r["step_time_s"] for r in train[1:])[len(train[1:]) // 2] if len(train) > 1 else None,
            "host": compile_report.get("host"),
            **({"step_times": [r["step_time_s"] for r in train[1:]]} if all_step_times else {})}


def compare(a: dict, b: dict) -> dict:
    same = all(a[k] == b[k] for k in ("loss", "grad_norm", "param_norm", "eval"))
    diffs = [abs(x - y) for x, y in zip(a["loss"], b["loss"])]
    first = next((i + 1 for i, d in enumerate(diffs) if d), None)
    return {"bit_identical": same, "first_loss_step_differing": first, "max_abs_loss_diff": max(diffs, default=0.0),
            "max_abs_eval_loss_diff": max((abs(a["eval"][k] - b["eval"][k]) for k in a["eval"]), default=0.0)}


def _write(a, results: dict) -> None:
    out = {"steps": a.steps, "pin": a.pin, "threads": a.threads, "command": "python benchmarks/xla_cpu_bits.py " + " ".join(a.argv),
           "models": results}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="peer,dense")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pin", default="AVX2", help="TrainConfig.xla_cpu_pin of the pinned variants")
    p.add_argument("--threads", type=int, default=2, help="TrainConfig.xla_cpu_threads of the pinned variants")
    p.add_argument("--only", default=None, help="regex on variant names (a variant whose reference is left out is skipped)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks/results/xla_cpu_bits.json"))
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else argv
    all_variants = variants(a.pin, a.threads)
    chosen = [v for v in all_variants if a.only is None or re.search(a.only, v["name"])]
    tmp = Path(tempfile.mkdtemp(prefix="xla_cpu_bits_"))
    results = {}
    try:
        for model in a.models.split(","):
            runs, rows = {}, []
            for v in chosen:
                if v["ref"] is not None and v["ref"] not in runs:
                    continue
                runs[v["name"]] = run_one(MODELS[model], v, a.steps, tmp / f"{model}_{len(runs)}")
                row = {"variant": v["name"], "vs": v["ref"], "wall_s": runs[v["name"]]["wall_s"],
                       "step_s": runs[v["name"]]["step_s"], "final_loss": runs[v["name"]]["loss"][-1],
                       "eval": runs[v["name"]]["eval"]}
                if v["ref"] is not None:
                    row.update(compare(runs[v["name"]], runs[v["ref"]]))
                rows.append(row)
                same = {True: "same bits", False: "DIFFERENT", None: "reference"}[row.get("bit_identical")]
                print(f"{model:6s} {v['name']:32s} {same:10s} vs {str(v['ref']):12s} final loss {row['final_loss']!r} "
                      f"max|Δloss| {row.get('max_abs_loss_diff', 0):.3g}  wall {row['wall_s']:.0f} s", flush=True)
                results[model] = {"gin_file": MODELS[model], "rows": rows, "host": next(iter(runs.values()))["host"]}
                _write(a, results)  # after every run: a long measurement keeps what it has
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
