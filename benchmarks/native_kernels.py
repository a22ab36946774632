"""Micro-benchmark of each C++ kernel of ``peer_jax.native`` at the PEER layer's shapes.

  python benchmarks/native_kernels.py                  # both sizes, all threads (~1 minute)
  python benchmarks/native_kernels.py --threads 1      # one thread: per-kernel CPU cost

Shapes are those of one forward+backward step of the paper's layer (2048 tokens, h = 8, k = 16,
d_key = 128) at (d = 256, N = 256²) and (d = 512, N = 512²), with uniformly random expert indices
(the trained layer's are close to uniform: query BatchNorm keeps usage high):

* ``group_by_row``      the counting sort of the 2048·128 (token, slot) pairs by table row;
* ``gather_dot``        ⟨x[t], U[e]⟩ for every pair (the expert input dots);
* ``embedding_bag``     Σ_slot w·V[e] per token (the expert outputs);
* ``scatter_outer``     the [N, d] table gradient Σ_pairs w·y[t];
* ``product_key_select`` the selection over 16,384 query rows (two half top-16's of √N sub-key
                        scores, the 50 candidate sums, the final top-16), and the two token-centric
                        kernels of its backward on the [√N, 64] sub-key table (``bag_small``,
                        ``scatter_small``).

``--threads`` sets ``PEER_JAX_NATIVE_THREADS`` (the number of chunks each kernel splits its work
into on XLA's intra-op thread pool). Reported: median and minimum of --steps timed calls after one
warm-up call, as a table and as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,512", help="comma-separated d_model values (N = d²)")
    p.add_argument("--threads", type=int, default=0, help="PEER_JAX_NATIVE_THREADS (0: the pool's size)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/native_kernels[_1thread].json)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["PEER_JAX_NATIVE_THREADS"] = str(args.threads)

    from peer_jax import runtime

    runtime.configure_malloc("auto")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from peer_jax import native

    native.ensure_available()
    tokens, slots, k, half = 2048, 8 * 16, 16, 64
    rows = []
    print(f"native kernels, {platform.machine()} × {os.cpu_count()} cores, threads: {args.threads or 'pool'}; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'d':>5} {'N':>8}  {'kernel':22s} {'median ms':>10} {'min ms':>8}")
    for d in (int(s) for s in args.sizes.split(",")):
        n, sub = d * d, d
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((tokens, d), np.float32))
        table = jnp.asarray(rng.standard_normal((n, d), np.float32))
        idx = jnp.asarray(rng.integers(0, n, (tokens, slots), dtype=np.int32))
        w = jnp.asarray(rng.standard_normal((tokens, slots), np.float32))
        groups = jax.block_until_ready(jax.jit(lambda i, n=n: native.group_by_row(i, n))(idx))
        q_rows = tokens * 8
        s1, s2 = (jnp.asarray(rng.standard_normal((q_rows, sub), np.float32)) for _ in range(2))
        keys = jnp.asarray(rng.standard_normal((sub, half), np.float32))
        q = jnp.asarray(rng.standard_normal((q_rows, half), np.float32))
        sub_idx = jnp.asarray(rng.integers(0, sub, (q_rows, k), dtype=np.int32))
        ds = jnp.asarray(rng.standard_normal((q_rows, k), np.float32))
        cases = {
            "group_by_row": (lambda i, n=n: native.group_by_row(i, n), (idx,)),
            "gather_dot": (native.gather_dot, (x, table, idx, groups)),
            "embedding_bag": (native.embedding_bag, (table, idx, w, groups)),
            "scatter_outer": (lambda i, w, y, g, n=n: native.scatter_outer(i, w, y, n, g), (idx, w, x, groups)),
            "product_key_select": (lambda a, b: native.product_key_select(a, b, k), (s1, s2)),
            "bag_small": (native.embedding_bag, (keys, sub_idx, ds)),
            "scatter_small": (lambda i, w, y, sub=sub: native.scatter_outer(i, w, y, sub), (sub_idx, ds, q)),
        }
        for name, (fn, fargs) in cases.items():
            f = jax.jit(fn)
            jax.block_until_ready(f(*fargs))
            ts = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*fargs))
                ts.append(time.perf_counter() - t0)
            med, best = 1e3 * float(np.median(ts)), 1e3 * min(ts)
            rows.append({"d": d, "N": n, "kernel": name, "median_ms": med, "min_ms": best})
            print(f"{d:>5} {n:>8}  {name:22s} {med:>10.2f} {best:>8.2f}", flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "native_kernels" + ("_1thread" if args.threads == 1 else "") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads or "pool",
                   "load_after": os.getloadavg()[0], "rows": rows}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
