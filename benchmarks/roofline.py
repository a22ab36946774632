"""Roofline of the PEER layer on this machine: what must move and be computed per token, what
this machine can do, and how close a measured step time gets.

  python benchmarks/roofline.py                 # machine numbers + per-token costs of the two sizes
  python benchmarks/roofline.py --d_model 512 --num_experts 262144 --step_s 0.9

Cost model, forward+backward of one PEER layer per token (S = h·k retrieved experts, p = bytes per
parameter, n = √N; the layer's contract returns dense ``[N, d]`` table gradients):

* **experts (memory-bound)**: the smaller of two ways to move the table rows.
  *Token-centric* (XLA's gathers and scatters, ``compute="efficient"``): every retrieved row is
  moved for the token that retrieved it, with no reuse across tokens: forward reads S rows of u
  and S of v (2·S·d·p); backward reads them again for dx and for the router gradient (2·S·d·p;
  keeping them from the forward instead would write and read the same amount); the table
  gradients are scatter-added, a read-modify-write of S rows each (2·2·S·d·4); plus the dense
  gradient tables written once per step (2·N·d·4 bytes, amortised over the step's tokens).
  *Expert-centric* (the (token, slot) pairs grouped by row, ``compute="native"``): each row a
  step touches is read once per pass — u and v in the forward, u and v again in the backward
  (4·R·d·p per step, R = expected distinct rows touched, N·(1 − (1 − 1/N)^(tokens·S)) under
  uniform routing) — and the dense gradient tables are written once (2·N·d·4); the token-side
  rows (M·d floats) stay in cache. Expert FLOPs (12·S·d) are negligible at ~1 FLOP/byte.
* **routing (compute-bound)**: query projection 2·d·h·d_key and sub-key scoring 2·h·n·d_key
  FLOPs forward (two halves of d_key/2 against n sub-keys, per head), ×3 for forward+backward.
  The top-k selections and BatchNorm are O(h·n) comparisons / O(h·d_key) elementwise work per
  token and are not counted (they are what the bound leaves out — see the benchmark's notes).

Bound = Σ_phase max(bytes/bandwidth, FLOPs/matmul-throughput), with this machine's *measured*
memory bandwidth (the best of a numpy copy, a jnp in-place update and a jnp reduction over
256 MiB) and matmul throughput (best jnp.dot of 2048² float32). Fraction = bound / measured time
(1.0 = at the roofline). Taking the best bandwidth makes the fraction conservative.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np


def _best_time(fn, reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_machine(mib: int = 256, reps: int = 7) -> dict:
    """Memory bandwidth (bytes/s, read + write counted) and float32 matmul FLOP/s, best of `reps`."""
    import jax
    import jax.numpy as jnp

    n = mib * 2**20 // 4
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    bw = {"numpy_copy": 2 * a.nbytes / _best_time(lambda: np.copyto(b, a), reps)}
    del b
    ja = jnp.asarray(a)
    red = jax.jit(jnp.sum)
    bw["jnp_sum"] = a.nbytes / _best_time(lambda: red(ja).block_until_ready(), reps)
    upd = jax.jit(lambda x: x * 1.0000001 + 1e-9, donate_argnums=0)  # in place: no page faults
    box = [ja]

    def inplace():
        box[0] = upd(box[0])
        box[0].block_until_ready()

    bw["jnp_inplace_update"] = 2 * a.nbytes / _best_time(inplace, reps)
    del box, ja, a
    m = 2048
    x = jnp.asarray(np.random.default_rng(0).standard_normal((m, m)), jnp.float32)
    dot = jax.jit(jnp.dot)
    flops = 2 * m**3 / _best_time(lambda: dot(x, x).block_until_ready(), max(3, reps // 2))
    return {"bandwidth_bytes_per_s": max(bw.values()), "bandwidth_by_method": bw, "matmul_flops_per_s": flops,
            "loadavg_1min": os.getloadavg()[0]}


def peer_costs(d_model: int, num_experts: int, heads: int = 8, top_k: int = 16, d_key: int = 128,
               tokens: int = 2048, param_bytes: int = 4, grad_bytes: int = 4) -> dict:
    """Per-token bytes and FLOPs of one PEER layer's forward+backward (see module docstring)."""
    s, d, n = heads * top_k, d_model, math.isqrt(num_experts)
    rows = s * d
    dense_tables = 2 * num_experts * d * grad_bytes / tokens
    token_centric = {
        "fwd_gather_u_v": 2 * rows * param_bytes,
        "bwd_gather_u_v": 2 * rows * param_bytes,
        "bwd_scatter_add_du_dv": 2 * 2 * rows * grad_bytes,
        "dense_grad_tables": dense_tables,
    }
    touched = num_experts * -math.expm1(tokens * s * math.log1p(-1.0 / num_experts))
    expert_centric = {
        "fwd_read_u_v": 2 * touched * d * param_bytes / tokens,
        "bwd_read_u_v": 2 * touched * d * param_bytes / tokens,
        "dense_grad_tables": dense_tables,
    }
    strategy = "expert_centric" if sum(expert_centric.values()) < sum(token_centric.values()) else "token_centric"
    expert_bytes = expert_centric if strategy == "expert_centric" else token_centric
    routing_flops = {
        "query_projection": 3 * 2 * d * heads * d_key,
        "sub_key_scores": 3 * 2 * heads * n * d_key,
    }
    return {
        "experts_bytes": expert_bytes,
        "experts_strategy": strategy,
        "experts_bytes_token_centric": token_centric,
        "experts_bytes_expert_centric": expert_centric,
        "rows_touched_per_step": touched,
        "experts_flops": 12.0 * rows,
        "routing_flops": routing_flops,
        "routing_bytes": 0.0,  # weights and keys are read once per step: negligible per token
    }


def bound_seconds_per_token(costs: dict, machine: dict) -> dict:
    bw, fl = machine["bandwidth_bytes_per_s"], machine["matmul_flops_per_s"]
    experts = max(sum(costs["experts_bytes"].values()) / bw, costs["experts_flops"] / fl)
    routing = max(sum(costs["routing_flops"].values()) / fl, costs["routing_bytes"] / bw)
    return {"experts": experts, "routing": routing, "total": experts + routing}


def report(d_model, num_experts, tokens, machine, step_s=None, **kw) -> dict:
    costs = peer_costs(d_model, num_experts, tokens=tokens, **kw)
    bound = bound_seconds_per_token(costs, machine)
    out = {"d_model": d_model, "num_experts": num_experts, "tokens": tokens, "costs": costs,
           "bound_s_per_token": bound, "bound_step_s": bound["total"] * tokens,
           "bound_tokens_per_s": 1.0 / bound["total"]}
    if step_s is not None:
        out["measured_step_s"] = step_s
        out["fraction_of_roofline"] = out["bound_step_s"] / step_s
    return out


def format_machine(machine: dict) -> str:
    by = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in machine["bandwidth_by_method"].items())
    return (f"memory bandwidth {machine['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (best of: {by}); "
            f"float32 matmul {machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; load {machine['loadavg_1min']:.1f}")


def format_report(r: dict) -> str:
    c = r["costs"]
    mb = sum(c["experts_bytes"].values()) / 1e6
    rf = sum(c["routing_flops"].values()) / 1e6
    line = (f"d={r['d_model']}, N={r['num_experts']}: experts {mb:.2f} MB/token {c['experts_strategy']} "
            f"({', '.join(f'{k} {v / 1e6:.3f}' for k, v in c['experts_bytes'].items())}), routing {rf:.2f} MFLOP/token; "
            f"bound {1e6 * r['bound_s_per_token']['total']:.1f} µs/token (experts "
            f"{1e6 * r['bound_s_per_token']['experts']:.1f}, routing {1e6 * r['bound_s_per_token']['routing']:.1f}) "
            f"= {r['bound_step_s'] * 1e3:.1f} ms per {r['tokens']}-token step, {r['bound_tokens_per_s']:.0f} tokens/s")
    if "measured_step_s" in r:
        line += f"; measured {1e3 * r['measured_step_s']:.1f} ms → {100 * r['fraction_of_roofline']:.0f} % of roofline"
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, action="append")
    p.add_argument("--num_experts", type=int, action="append")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--step_s", type=float, action="append", help="measured step time(s) to compare")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sizes = list(zip(args.d_model or [256, 512], args.num_experts or [256**2, 512**2]))
    machine = measure_machine()
    print(format_machine(machine))
    rows = []
    for i, (d, n) in enumerate(sizes):
        step = args.step_s[i] if args.step_s and i < len(args.step_s) else None
        rows.append(report(d, n, args.tokens, machine, step))
        print(format_report(rows[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "sizes": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
