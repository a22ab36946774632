"""Training throughput of the tiny PEER LM vs tiny dense LMs (one process, interleaved timing).

  python benchmarks/train_throughput.py --label after        # ~3-5 minutes on 2 busy CPU cores

Variants (each the full jitted train step of `peer_jax.training.step`: forward, backward,
AdamW update, on synthetic byte tokens of the run's shape, batch 32 × 128 = 4096 tokens):

* ``peer``          configs/runs/tiny_cpu_peer.gin (configs/models/peer_tiny.gin: the middle
                    block's FFW is PEER with N = 128², h = 4, k = 8, d_key = 32).
* ``peer_native``   the same with ``peer.PEER.compute = "native"`` (C++ kernels, peer_jax.native).
* ``dense_matched`` configs/runs/tiny_cpu.gin with the *middle* block's FFW a dense GELU MLP whose
                    hidden width m is chosen so that its forward FLOPs per token (4·d·m) equal the
                    PEER layer's counted FLOPs (query, sub-key scores, k² sums, u_iᵀx, Σ g·σ·v;
                    `peer_jax.flops.peer_ffw`) — the whole model then has the same FLOPs per token
                    up to the rounding of m (printed). This is the "dense model at equal FLOPs".
* ``dense``         configs/runs/tiny_cpu.gin unchanged (4·d hidden everywhere; ~9 % more FLOPs).

Timing: after --warmup untimed steps per variant, --rounds rounds; in each round every variant
runs --steps timed steps back to back (variants interleaved, so background load on the shared
machine hits all of them alike). Reported: median step time over all timed steps, tokens/s, model
FLOP/s (`peer_jax.flops` train FLOPs = 3 × forward), and tokens/s of PEER relative to each dense
variant. The load average before and after is printed; compare ratios, not absolute numbers,
across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from peer_jax import flops as flops_lib
from peer_jax import gin_utils, runtime, sharding
from peer_jax.training import step as step_lib
from peer_jax.training.config import TrainConfig

VOCAB = 256  # byte vocabulary, rounded up to vocab_multiple=128


def _matched_mlp_dim(peer_gin: str) -> tuple[int, float]:
    """Hidden width of a dense GELU MLP with the PEER layer's forward FLOPs per token."""
    import gin

    gin_utils.parse([peer_gin], [])
    cfg = gin.get_configurable(TrainConfig)()
    model = flops_lib.abstract_transformer(VOCAB, cfg.model)
    peer = model.blocks[model.sparse_blocks[0]].ffw
    peer_flops = sum(flops_lib.ffw_count(peer, seq_len=cfg.seq_len).terms.values())
    return max(1, round(peer_flops / (4 * model.d_model))), peer_flops


def build(name: str, gin_files: list[str], bindings: list[str]) -> dict:
    """Parses the config, creates the train state and AOT-compiles the step (gin active throughout)."""
    import gin

    gin_utils.parse(gin_files, bindings)
    cfg = gin.get_configurable(TrainConfig)()
    tx, _ = cfg.optimizer(1000)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = sharding.get_rules(cfg.sharding_rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup, state, shardings = step_lib.create_train_state(cfg.model, tx, VOCAB, cfg.seq_len, 0, mesh, rules)
        step = step_lib.jit_train_step(step_lib.make_train_step(setup, tx), shardings, setup)
        rng = np.random.default_rng(0)
        shape = (cfg.batch_size, cfg.seq_len)
        tokens = rng.integers(1, VOCAB, shape).astype(np.int32)
        batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "weights": np.ones(shape, np.float32),
                 "segment_ids": np.ones(shape, np.int32),
                 "positions": np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), shape).copy()}
        batch = step_lib.host_batch(batch, setup)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        model = flops_lib.abstract_transformer(VOCAB, cfg.model)
        count = flops_lib.count(model, cfg.seq_len, cfg.batch_size // cfg.grad_accum_steps)
        params = flops_lib.param_counts(model, cfg.seq_len)
    mem = compiled.memory_analysis()
    gin.clear_config()
    return {
        "name": name, "gin_files": gin_files, "bindings": bindings, "compiled": compiled, "state": state,
        "batch": batch, "tokens_per_step": int(np.prod(shape)), "compile_s": compile_s,
        "train_flops_per_token": count.train, "forward_flops_per_token": count.forward,
        "params_total": params["total"], "params_active": params["active"],
        "temp_bytes": int(mem.temp_size_in_bytes),
    }


def time_interleaved(variants: list[dict], warmup: int, rounds: int, steps: int) -> list[float]:
    """Times every built variant's step: `warmup` untimed steps each, then `rounds` rounds in
    which each variant runs `steps` timed steps back to back (interleaved, so background load
    hits all alike). Each step reads v["batch"], or the next of v["batches"] (cycled). Appends
    the step times to v["times"] and, per round, to v["round_times"]; returns the 1-minute load
    average after each round. The state is donated and replaced."""
    def run(v):
        batches = v.get("batches") or [v["batch"]]
        batch = batches[v["calls"] % len(batches)]
        v["calls"] += 1
        v["state"] = jax.block_until_ready(v["compiled"](v["state"], batch)[0])

    for v in variants:
        v["calls"] = 0
        for _ in range(warmup):
            run(v)
        v["times"], v["round_times"] = [], []
    loads = []
    for r in range(rounds):
        for v in variants:
            v["round_times"].append([])
            for _ in range(steps):
                t0 = time.perf_counter()
                run(v)
                v["round_times"][-1].append(time.perf_counter() - t0)
            v["times"].extend(v["round_times"][-1])
        loads.append(os.getloadavg()[0])
        print(f"... round {r + 1}/{rounds}, load {loads[-1]:.1f}", file=sys.stderr, flush=True)
    return loads


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout
        return rev.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="current", help="tag stored in the JSON (e.g. before / after)")
    p.add_argument("--peer_gin", default="configs/runs/tiny_cpu_peer.gin")
    p.add_argument("--dense_gin", default="configs/runs/tiny_cpu.gin")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--gin", action="append", default=[], help="extra binding for the PEER variant, e.g. "
                   "'peer.PEER.slot_block=32' (repeatable)")
    p.add_argument("--skip_native", action="store_true", help="leave out the compute='native' PEER variant")
    p.add_argument("--out", default=None, help="default: benchmarks/results/train_throughput_<label>.json")
    args = p.parse_args(argv)
    allocator = runtime.configure_malloc()  # as `python -m peer_jax.train` does (peer_jax/runtime.py)
    out_path = args.out or f"benchmarks/results/train_throughput_{args.label}.json"

    mlp_dim, peer_flops = _matched_mlp_dim(args.peer_gin)
    matched = [
        "transformer.Transformer.sparse_ffw = @matched/dense.DenseFFW",
        f"matched/dense.DenseFFW.mlp_dim = {mlp_dim}",
    ]
    load_before = os.getloadavg()
    variants = []
    native = [] if args.skip_native else [("peer_native", [args.peer_gin], [*args.gin, 'peer.PEER.compute = "native"'])]
    for name, files, binds in [("peer", [args.peer_gin], args.gin), *native, ("dense_matched", [args.dense_gin], matched),
                               ("dense", [args.dense_gin], [])]:
        print(f"... building {name}", file=sys.stderr, flush=True)
        variants.append(build(name, files, binds))
    time_interleaved(variants, args.warmup, args.rounds, args.steps)
    load_after = os.getloadavg()

    rows = []
    for v in variants:
        med = statistics.median(v["times"])
        rows.append({k: v[k] for k in ("name", "gin_files", "bindings", "tokens_per_step", "compile_s",
                                        "train_flops_per_token", "forward_flops_per_token", "params_total",
                                        "params_active", "temp_bytes")}
                    | {"step_s_median": med, "step_s_all": v["times"], "tokens_per_s": v["tokens_per_step"] / med,
                       "model_tflops_per_s": v["tokens_per_step"] * v["train_flops_per_token"] / med / 1e12})
    by = {r["name"]: r for r in rows}
    ratios = {f"{p}_vs_{n}": by[p]["tokens_per_s"] / by[n]["tokens_per_s"]
              for p in ("peer", "peer_native") if p in by for n in ("dense_matched", "dense")}

    print(f"\nTiny-model training throughput [{args.label}, {_git_rev()}], {by['peer']['tokens_per_step']} tokens/step, "
          f"{jax.default_backend()} × {os.cpu_count()} cores, load average before/after "
          f"{load_before[0]:.1f}/{load_after[0]:.1f}; matched dense middle FFW: mlp_dim={mlp_dim} "
          f"(4·d·m = {4 * 128 * mlp_dim:.0f} vs PEER layer {peer_flops:.0f} FLOPs/token fwd)")
    head = (f"{'model':<15}{'params':>11}{'train FLOPs/tok':>17}{'step ms':>10}{'tokens/s':>11}{'GFLOP/s':>9}"
            f"{'PEER ÷ this':>13}{'native ÷ this':>15}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = by["peer"]["tokens_per_s"] / r["tokens_per_s"]
        native = by["peer_native"]["tokens_per_s"] / r["tokens_per_s"] if "peer_native" in by else float("nan")
        print(f"{r['name']:<15}{r['params_total']:>11,.0f}{r['train_flops_per_token']:>17,.0f}"
              f"{1e3 * r['step_s_median']:>10.1f}{r['tokens_per_s']:>11.0f}{1e3 * r['model_tflops_per_s']:>9.1f}"
              f"{ratio:>13.3f}{native:>15.3f}")

    out = {"label": args.label, "git": _git_rev(), "config": vars(args), "allocator": allocator,
           "matched_mlp_dim": mlp_dim,
           "peer_layer_forward_flops_per_token": peer_flops, "jax": jax.__version__,
           "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "loadavg_1min_before_after": [load_before[0], load_after[0]], "results": rows, "ratios": ratios}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
