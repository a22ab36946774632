"""Which XLA:CPU paths follow --xla_cpu_max_isa and which depend on the thread count: single ops.

  python benchmarks/xla_cpu_ops_bits.py            # ~2 minutes
  python benchmarks/xla_cpu_ops_bits.py --child    # one setting: prints the hashes (used by the above)

A matmul of the shape of an activation (4096 x 128 x 384), two with a long contraction like a
weight gradient (128 x 4096 x 128, 32 x 4096 x 512), one square (256 x 512 x 256), an
elementwise chain (tanh, exp, multiply-add) and a column sum, on fixed random float32 inputs.
Each setting runs in a fresh process (XLA reads its flags when the backend starts): ISA caps
SSE4_2 / AVX / AVX2 / AVX512 and none, with YNNPACK library fusions on (XLA's default) and off
(--xla_cpu_experimental_ynn_fusion_type=), on both cores and on one (taskset -c 0). Prints a
table of output hashes: equal hashes = equal bits.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

DOTS = ((4096, 128, 384), (128, 4096, 128), (32, 4096, 512), (256, 512, 256))


def child() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)

    def digest(x) -> str:
        return hashlib.sha1(np.asarray(x).tobytes()).hexdigest()[:8]

    out = []
    dot = jax.jit(lambda a, b: a @ b)
    for m, k, n in DOTS:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        out.append(digest(dot(a, b)))
    x = rng.standard_normal((4096, 128), np.float32)
    out.append(digest(jax.jit(lambda x: jnp.tanh(x) * jnp.exp(0.1 * x) + 0.5 * x * x)(x)))
    out.append(digest(jax.jit(lambda x: x.sum(axis=0))(x)))
    print(" ".join(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true")
    a = p.parse_args(argv)
    if a.child:
        child()
        return 0
    cols = [f"dot {m}x{k}x{n}" for m, k, n in DOTS] + ["elementwise", "column sum"]
    print("| cap | YNNPACK | threads | " + " | ".join(cols) + " |\n|" + "---|" * (3 + len(cols)))
    for ynn in ("on", "off"):
        for cap in ("SSE4_2", "AVX", "AVX2", "AVX512", None):
            for cpus in ("0,1", "0"):
                flags = ([f"--xla_cpu_max_isa={cap}"] if cap else []) + (
                    ["--xla_cpu_experimental_ynn_fusion_type="] if ynn == "off" else [])
                env = dict(os.environ, XLA_FLAGS=" ".join(flags), TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
                res = subprocess.run(["taskset", "-c", cpus, sys.executable, __file__, "--child"], env=env,
                                     capture_output=True, text=True, check=True)
                hashes = res.stdout.split()
                print(f"| {cap or 'none'} | {ynn} | {len(cpus.split(','))} | " + " | ".join(hashes) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
