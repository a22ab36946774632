"""Train-step time of every shape of an isoFLOP grid at one budget (one process, interleaved).

  nice -n 5 python benchmarks/isoflop_step_time.py configs/isoflop/mini2 --budget 1e13
  python benchmarks/isoflop_step_time.py configs/isoflop/mini2 --budget 1e13 --only 'L2_d48' --rounds 2 --steps 2

What the iso-wall-clock view (`python -m peer_jax.isoflop.wallclock`) reads. Each point of
GRID/grid.json at --budget (or those --only / --methods keep) is built exactly as the trainer
builds it: its gin file, `peer_jax.training.build.build`, `Built.init_state`, and the jitted
train step (forward, backward, AdamW) compiled ahead of time against the abstract batch, as
`Trainer.compile` does. Batches are --batches real training batches of the point's task and
shape (the trainer's `ArrayBatches` at the point's data seed), cycled. PEER and PKM points are
timed once per --modes entry (`peer.PEER.compute` / `pkm.PKM.compute`, default "efficient" and
"native"); a variant is `<point>` or `<point>/<mode>`.

Each variant is compiled once, one after the other, and kept (the grids' models are small;
the RSS after compiling is reported); compile time is reported apart from step time. Then
--warmup untimed steps per variant, and --rounds rounds in which every variant runs --steps
timed steps back to back (`train_throughput.time_interleaved`), so background load hits all
variants alike. Reported per variant: median step time, the interquartile range, min / max,
the median of each round, and predicted training wall time (the point's num_steps × median;
evals, checkpoints and start-up are not in it). Also: the host (`peer_jax.host.describe`),
the load average before and after and after each round, and the XLA:CPU pin and thread count,
applied as the points set them (`TrainConfig.xla_cpu_pin` / `xla_cpu_threads`; every point of
one run must agree, since XLA reads them once per process). Output: a table, and JSON (default
benchmarks/results/isoflop_step_time/<grid>_<budget>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import _git_rev, time_interleaved  # noqa: E402

from peer_jax import cli, gin_utils, host, runtime  # noqa: E402
from peer_jax.isoflop import sweep  # noqa: E402
from peer_jax.isoflop.grids import budget_tag  # noqa: E402

# method name prefix -> the gin parameter of its sparse layer's compute mode
COMPUTE_BINDING = {"peer": "peer.PEER.compute", "pkm": "pkm.PKM.compute"}
MODES = ("efficient", "native")


def compute_param(method: str) -> str | None:
    """The compute-mode gin parameter of a method's sparse layer (PEER or PKM), else None."""
    return next((b for prefix, b in COMPUTE_BINDING.items() if method.startswith(prefix)), None)


def variant_specs(points: list[dict], modes: list[str]) -> list[dict]:
    """One spec per timed variant: every point, PEER/PKM points once per compute mode."""
    specs = []
    for p in points:
        param = compute_param(p["method"])
        for mode in (modes if param else [None]):
            specs.append({"name": p["name"] + (f"/{mode}" if mode else ""), "point": p, "compute": mode,
                          "bindings": [f'{param} = "{mode}"'] if mode else []})
    return specs


def _config(gin_file: str, bindings: list[str]):
    import gin

    from peer_jax.training.config import TrainConfig

    gin_utils.parse([gin_file], bindings)
    return gin.get_configurable(TrainConfig)()


def pin_as_points_do(specs: list[dict]) -> tuple[str | None, int | None]:
    """Checks every variant's config (before JAX's backend starts) and applies their common
    XLA:CPU pin and thread count; raises ValueError naming the first point that differs."""
    from peer_jax.training import build as build_lib

    first = None
    for s in specs:
        cfg = _config(s["point"]["gin_file"], s["bindings"])
        build_lib.validate(cfg)
        pins = (cfg.xla_cpu_pin, cfg.xla_cpu_threads)
        if first is None:
            first, first_cfg, first_name = pins, cfg, s["name"]
        elif pins != first:
            raise ValueError(f"{s['name']} sets (xla_cpu_pin, xla_cpu_threads) = {pins} but {first_name} sets "
                             f"{first}: XLA:CPU takes them once per process; time those points in separate runs "
                             "(--only / --methods).")
    host.pin(first_cfg)
    return first


def rss_bytes() -> int:
    """This process's resident set size now (Linux), else its peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_variant(spec: dict, num_batches: int, packed: dict) -> dict:
    """Builds and compiles one variant as the trainer does; `packed` caches the packed data."""
    import gin

    from peer_jax.data import pipeline
    from peer_jax.training import build as build_lib
    from peer_jax.training import step as step_lib

    t_setup = time.perf_counter()
    cfg = _config(spec["point"]["gin_file"], spec["bindings"])
    built = build_lib.build(cfg)
    with built.context():
        state = built.init_state()
        t0 = time.perf_counter()
        compiled = built.train_step.lower(state, built.abstract_batch()).compile()
        compile_s = time.perf_counter() - t0
        key = (cfg.train_task, cfg.train_split, cfg.seq_len, cfg.vocabulary)
        if key not in packed:
            packed[key] = pipeline.packed_arrays(cfg.train_task, cfg.train_split, cfg.seq_len, built.vocab)
        it = pipeline.ArrayBatches(packed[key], cfg.batch_size, seed=cfg.data_seed)
        batches = [step_lib.host_batch(next(it), built.setup, cfg.batch_size) for _ in range(num_batches)]
    gin.clear_config()
    # set-up: parsing, building, the initial state (its initialiser is jitted too) and the batches
    setup_s = time.perf_counter() - t_setup - compile_s
    return {**spec, "compiled": compiled, "state": state, "batches": batches, "compile_s": compile_s,
            "setup_s": setup_s, "tokens_per_step": cfg.batch_size * cfg.seq_len}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


def variant_row(v: dict) -> dict:
    p, times = v["point"], v["times"]
    med = statistics.median(times)
    gin_file = os.path.relpath(p["gin_file"], gin_utils.REPO_ROOT) if os.path.isabs(p["gin_file"]) else p["gin_file"]
    return {
        "name": v["name"], "point": p["name"], "method": p["method"], "compute": v["compute"], "gin_file": gin_file,
        "bindings": v["bindings"], "num_layers": p.get("num_layers"), "d_model": p.get("d_model"),
        "num_heads": p.get("num_heads"), "num_steps": int(p["num_steps"]), "tokens_per_step": v["tokens_per_step"],
        "train_flops_per_token": p.get("train_flops_per_token"), "params": p.get("params"),
        "compile_s": v["compile_s"], "setup_s": v["setup_s"], "step_s_median": med,
        "step_s_p25": _quantile(times, 0.25), "step_s_p75": _quantile(times, 0.75),
        "step_s_min": min(times), "step_s_max": max(times),
        "step_s_round_medians": [statistics.median(r) for r in v["round_times"]],
        "step_s_by_round": v["round_times"], "predicted_wall_s": int(p["num_steps"]) * med,
    }


def print_table(out: dict) -> None:
    h = out["host"]
    print(f"\nisoFLOP train-step time, grid {out['grid']} at {budget_tag(out['budget'])} [{out['git']}]: "
          f"{h['cpu_model']}, XLA:CPU {h['xla_cpu_isa']} (pin {out['xla_cpu_pin']}), {h['usable_cpus']} thread(s); "
          f"{out['rounds']} rounds × {out['steps']} steps; load average before/after "
          f"{out['loadavg_before'][0]:.1f}/{out['loadavg_after'][0]:.1f}")
    head = (f"{'variant':<34}{'steps':>7}{'compile s':>11}{'step ms':>9}{'IQR ms':>17}{'min–max ms':>17}"
            f"{'wall s':>9}")
    print(head)
    print("-" * len(head))
    for r in out["variants"]:
        iqr = f"{1e3 * r['step_s_p25']:.1f}–{1e3 * r['step_s_p75']:.1f}"
        mm = f"{1e3 * r['step_s_min']:.1f}–{1e3 * r['step_s_max']:.1f}"
        print(f"{r['name']:<34}{r['num_steps']:>7}{r['compile_s']:>11.1f}{1e3 * r['step_s_median']:>9.1f}"
              f"{iqr:>17}{mm:>17}{r['predicted_wall_s']:>9.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid folder (with grid.json) or grid.json, e.g. configs/isoflop/mini2")
    p.add_argument("--budget", required=True, type=float, help="training FLOPs of the points to time, e.g. 1e13")
    p.add_argument("--only", default=None, help="regular expression: only points whose name matches")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    p.add_argument("--modes", default=",".join(MODES), help="compute modes of PEER/PKM points")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compiling")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--batches", type=int, default=4, help="distinct real batches per variant, cycled")
    p.add_argument("--out", default=None, help="default: benchmarks/results/isoflop_step_time/<grid>_<budget>.json")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    for name in ("warmup", "rounds", "steps", "batches"):
        low = 0 if name == "warmup" else 1
        if getattr(args, name) < low:
            return cli.fail(f"--{name}={getattr(args, name)} must be ≥ {low}.")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        return cli.fail(f"--modes={args.modes!r}: give a comma-separated subset of {','.join(MODES)}.")
    try:
        allocator = runtime.configure_malloc()  # as `python -m peer_jax.train` does, before the backend starts
        points = sweep.select(sweep.load_points(args.grid), args.only, args.methods, repr(args.budget))
        if not points:
            raise ValueError(f"no point of {args.grid} at budget {args.budget:g} matches --only/--methods; "
                             "check the budget against GRID/grid.md.")
        specs = variant_specs(points, modes)
        pins = pin_as_points_do(specs)
    except (OSError, ValueError) as e:  # gin_utils.ConfigError and host.PinError are ValueErrors
        return cli.fail(cli.first_line(e))
    grid = points[0].get("grid") or os.path.basename(os.path.normpath(args.grid))
    out_path = args.out or f"benchmarks/results/isoflop_step_time/{grid}_{budget_tag(args.budget)}.json"

    load_before = os.getloadavg()
    packed: dict = {}
    variants = []
    for s in specs:
        variants.append(build_variant(s, args.batches, packed))
        print(f"... compiled {s['name']} in {variants[-1]['compile_s']:.1f} s, RSS {rss_bytes() / 2**20:.0f} MiB",
              file=sys.stderr, flush=True)
    rss_compiled = rss_bytes()
    t_timing = time.perf_counter()
    round_load = time_interleaved(variants, args.warmup, args.rounds, args.steps)
    timing_s = time.perf_counter() - t_timing
    load_after = os.getloadavg()

    out = {
        "grid": grid, "grid_path": args.grid, "budget": args.budget, "git": _git_rev(),
        "host": host.describe(pins[0]), "xla_cpu_pin": pins[0], "xla_cpu_threads": pins[1], "allocator": allocator,
        "nice": os.nice(0), "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
        "batches": args.batches, "modes": modes, "loadavg_before": list(load_before),
        "loadavg_after": list(load_after), "loadavg_1min_after_round": round_load,
        "rss_bytes_after_compile": rss_compiled, "peak_rss_bytes": peak_rss_bytes(),
        "compile_s_total": sum(v["compile_s"] for v in variants),
        "setup_s_total": sum(v["setup_s"] for v in variants), "timing_s": timing_s,
        "total_s": time.perf_counter() - t_start,
        "variants": [variant_row(v) for v in variants],
    }
    print_table(out)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{len(variants)} variants: compile {out['compile_s_total']:.0f} s, other set-up "
          f"{out['setup_s_total']:.0f} s, timing {timing_s:.0f} s, "
          f"total {out['total_s']:.0f} s, RSS after compiling {rss_compiled / 2**20:.0f} MiB\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
