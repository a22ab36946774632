"""PEER layer micro-benchmark: forward+backward throughput and compiled temp memory.

Compares naive PEER (gathers [tokens, h, k, d] twice, kept for backward), efficient PEER
(custom_vjp gather loops; see peer_jax/layers/expert_compute.py) and a dense FFW of the same
d_model (2-layer GELU MLP, hidden 4·d). Each step is the gradient of a scalar loss with respect
to the input and every parameter, in training mode (query BatchNorm on batch statistics).

  python benchmarks/peer_layer.py                       # defaults: a few minutes on 2 CPU cores
  python benchmarks/peer_layer.py --d_model 512 --num_experts 262144 --tokens 4096 --skip_timing

Throughput = tokens / median step time over --steps timed steps after --warmup untimed ones.
Memory = XLA's `compiled.memory_analysis().temp_size_in_bytes` (scratch beyond arguments and
outputs), so it can be read at sizes too big to run. Results are printed as a table and written
as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peer_jax import runtime
from peer_jax.layers.peer import PEER


class DenseFFW(nnx.Module):
    """Reference dense FFW: d → 4d → d with GELU, no biases (same convention as PEER's experts)."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, hidden_mult: int = 4):
        self.up = nnx.Linear(d_model, hidden_mult * d_model, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(hidden_mult * d_model, d_model, use_bias=False, rngs=rngs)

    def __call__(self, x, *, mask=None, train: bool = False):
        return self.down(jax.nn.gelu(self.up(x)))


def build_step(abstract_model):
    """jit-able step: grads of sum(y²) wrt params and x, plus updated batch statistics."""
    gdef, state = nnx.split(abstract_model)

    def step(state, x):
        m = nnx.merge(gdef, state)

        def loss(m, x):
            return jnp.mean(jnp.square(m(x, train=True).astype(jnp.float32)))

        grads = nnx.grad(loss, argnums=(0, 1))(m, x)
        return grads, nnx.state(m, nnx.BatchStat)

    return jax.jit(step), state


def param_count(abstract_state) -> int:
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.filter_state(abstract_state, nnx.Param)))


def measure(name, factory, args) -> dict:
    batch = args.tokens // args.seq_len
    x_abs = jax.ShapeDtypeStruct((batch, args.seq_len, args.d_model), jnp.float32)
    abstract = nnx.eval_shape(factory)
    step, abs_state = build_step(abstract)
    t0 = time.perf_counter()
    compiled = step.lower(abs_state, x_abs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row = {
        "name": name,
        "params": param_count(abs_state),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "compile_s": compile_s,
    }
    if not args.skip_timing:
        model = factory()  # real parameters
        _, state = nnx.split(model)
        x = jnp.asarray(np.random.default_rng(0).standard_normal(x_abs.shape), jnp.float32)
        for _ in range(args.warmup):
            jax.block_until_ready(compiled(state, x))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(state, x))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        row.update(step_s_median=med, step_s_all=times, tokens_per_s=args.tokens / med)
        del model, state
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--num_experts", type=int, default=256**2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--top_k", type=int, default=16)
    p.add_argument("--d_key", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch · seq_len)")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--slot_blocks", default="1,8", help="comma-separated slot_block values for efficient PEER")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip_timing", action="store_true", help="compile-time memory only (no allocation)")
    p.add_argument("--skip_naive", action="store_true")
    p.add_argument("--skip_native", action="store_true", help="leave out compute='native' (C++ kernels)")
    p.add_argument("--out", default="benchmarks/results/peer_layer.json")
    args = p.parse_args(argv)
    allocator = runtime.configure_malloc()  # as `python -m peer_jax.train` does (peer_jax/runtime.py)
    if args.tokens % args.seq_len:
        p.error(f"--tokens={args.tokens} must be a multiple of --seq_len={args.seq_len}")

    peer_kw = dict(num_experts=args.num_experts, heads=args.heads, top_k=args.top_k, d_key=args.d_key)
    variants = []
    if not args.skip_naive:
        variants.append(("peer_naive", lambda: PEER(args.d_model, rngs=nnx.Rngs(0), compute="naive", **peer_kw)))
    for blk in (int(b) for b in args.slot_blocks.split(",")):
        variants.append((
            f"peer_efficient_b{blk}",
            lambda blk=blk: PEER(args.d_model, rngs=nnx.Rngs(0), compute="efficient", slot_block=blk, **peer_kw),
        ))
    if not args.skip_native:
        variants.append(("peer_native", lambda: PEER(args.d_model, rngs=nnx.Rngs(0), compute="native", **peer_kw)))
    variants.append(("dense_ffw_4d", lambda: DenseFFW(args.d_model, rngs=nnx.Rngs(0))))

    load_before = os.getloadavg()
    rows = []
    for name, factory in variants:
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(measure(name, factory, args))

    mib = 2**20
    head = f"{'layer':<22}{'params':>12}{'temp MiB':>11}{'args MiB':>10}{'out MiB':>9}{'step ms':>10}{'tokens/s':>11}"
    print(f"\nPEER layer benchmark, forward+backward, {args.tokens} tokens, d_model={args.d_model}, "
          f"N={args.num_experts}, h={args.heads}, k={args.top_k}, d_key={args.d_key}; "
          f"{jax.devices()[0].platform} × {os.cpu_count()} cores; allocator {allocator}; load average before/after "
          f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(head)
    print("-" * len(head))
    for r in rows:
        timing = (f"{1e3 * r['step_s_median']:>10.1f}{r['tokens_per_s']:>11.0f}" if "tokens_per_s" in r
                  else f"{'-':>10}{'-':>11}")
        print(f"{r['name']:<22}{r['params']:>12,}{r['temp_bytes'] / mib:>11.1f}{r['argument_bytes'] / mib:>10.1f}"
              f"{r['output_bytes'] / mib:>9.1f}{timing}")

    out = {
        "config": vars(args),
        "allocator": allocator,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
