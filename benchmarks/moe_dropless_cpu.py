"""Dropless MoE on CPU: `ragged_dot` (dense masked dot over all experts) against padded blocks.

  python benchmarks/moe_dropless_cpu.py            # ~3 minutes on 2 busy CPU cores

Every variant is the full jitted train step (`benchmarks/train_throughput.build`: forward,
backward, AdamW) of one isoFLOP grid point, on synthetic byte tokens of the point's shape;
only the named bindings differ between variants:

* ``ragged_dot``       the point as written before padded blocks existed
                       (`moe.MoE.grouped_matmul = "ragged_dot"`, the layer's default);
* ``blocks_<B>``       `moe.MoE.grouped_matmul = "padded_blocks"`, `moe.MoE.block_size = B`;
* ``dense``            the dense point of the same shape (the FLOP-matched baseline: a
                       dropless top-1 MoE has the dense model's FLOPs plus the d·E router).

Timing: warm-up steps, then --rounds rounds in which every variant runs --steps steps back to
back (interleaved, so background load hits all alike). Reported: median step time, ratio to
``ragged_dot`` and to ``dense``, counted train FLOPs per token and the counted overhead
(`peer_jax.flops`: the E − 1 extra experts per pair of ragged_dot on CPU, or the static block
padding). Results: benchmarks/results/moe_dropless_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import _git_rev, build, time_interleaved  # noqa: E402

from peer_jax import runtime  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--point", default="configs/isoflop/mini2/moe_dropless_1e13_L3_d96_h3.gin")
    p.add_argument("--dense", default="configs/isoflop/mini2/dense_1e13_L3_d96_h3.gin")
    p.add_argument("--blocks", default="32,64,128", help="block sizes to time")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/moe_dropless_cpu.json")
    args = p.parse_args(argv)
    allocator = runtime.configure_malloc()
    specs = [("ragged_dot", [args.point], ['moe.MoE.grouped_matmul = "ragged_dot"'])]
    for b in (int(v) for v in args.blocks.split(",")):
        specs.append((f"blocks_{b}", [args.point], ['moe.MoE.grouped_matmul = "padded_blocks"', f"moe.MoE.block_size = {b}"]))
    specs.append(("dense", [args.dense], []))
    load_before = os.getloadavg()
    variants = []
    for name, files, binds in specs:
        print(f"... building {name}", file=sys.stderr, flush=True)
        variants.append(build(name, files, binds))
    time_interleaved(variants, args.warmup, args.rounds, args.steps)
    load_after = os.getloadavg()

    by = {v["name"]: statistics.median(v["times"]) for v in variants}
    rows = []
    for v in variants:
        rows.append({k: v[k] for k in ("name", "gin_files", "bindings", "tokens_per_step", "compile_s",
                                        "train_flops_per_token", "temp_bytes")}
                    | {"step_s_median": by[v["name"]], "step_s_all": v["times"],
                       "speedup_vs_ragged_dot": by["ragged_dot"] / by[v["name"]],
                       "step_time_vs_dense": by[v["name"]] / by["dense"]})
    print(f"\nDropless MoE train step on CPU [{_git_rev()}], {variants[0]['tokens_per_step']} tokens/step, "
          f"{jax.default_backend()} × {os.cpu_count()} cores, load average before/after "
          f"{load_before[0]:.1f}/{load_after[0]:.1f}; point {args.point}")
    head = f"{'variant':<12}{'step ms':>10}{'× faster than ragged_dot':>26}{'÷ dense step':>14}{'temp MB':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<12}{1e3 * r['step_s_median']:>10.1f}{r['speedup_vs_ragged_dot']:>26.2f}"
              f"{r['step_time_vs_dense']:>14.2f}{r['temp_bytes'] / 1e6:>10.1f}")
    out = {"git": _git_rev(), "config": vars(args), "allocator": allocator, "jax": jax.__version__,
           "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
           "loadavg_1min_before_after": [load_before[0], load_after[0]], "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
