"""peer_jax's PEER layer vs the public PyTorch PEER (PyPI ``PEER-pytorch``) on this CPU.

Forward+backward of the paper's layer (softmax over each head's top-k, h = 8, k = 16,
d_key = 128, GELU experts) at (d = 256, N = 256²) and (d = 512, N = 512²), 2048 tokens per step
(4 × 512), plus a dense FFW (d → 4d → d, GELU, no biases) of the same width in both frameworks.
The loss is mean(y²); every step computes the gradients of all parameters and of the input.
peer_jax runs twice per key layout: ``compute="efficient"`` (XLA gathers and scatters) and
``compute="native"`` (the C++ kernels of ``peer_jax.native``; ``--skip_native`` leaves them out).

The PyTorch side lives in its own venv next to the project's (so torch's pins never touch the
project's environment; ``.venv-bench/`` is git-ignored). If ``--torch_python`` does not exist, the
benchmark creates that venv and installs the pinned set itself (``--no_install`` turns this off),
the same as running::

  python3 -m venv .venv-bench
  .venv-bench/bin/pip install torch==2.13.0+cpu    # the CPU-only build: the local "+cpu" label
                                                   # cannot resolve to a multi-GB CUDA wheel. Tried
                                                   # with pip's configured index first, then with
                                                   # --index-url https://download.pytorch.org/whl/cpu
  .venv-bench/bin/pip install --no-deps peer-pytorch==0.2.2   # no-deps: it must not pull torch
  .venv-bench/bin/pip install einops==0.8.2 einx==0.4.3       # its remaining (small) dependencies

Then::

  .venv/bin/python benchmarks/peer_vs_pytorch.py                    # ~10 min on 2 busy cores
  .venv/bin/python benchmarks/peer_vs_pytorch.py --malloc tuned     # same, caching glibc malloc
  .venv/bin/python benchmarks/peer_vs_pytorch.py --malloc thp       # same, huge pages
  .venv/bin/python benchmarks/peer_vs_pytorch.py --ref 39ab703      # + a row for that commit's layer

Results: a table on stdout and ``benchmarks/results/peer_vs_pytorch[_tuned|_thp].json``; see
docs/peer_speed.md for the numbers and what limits them.

How it measures. Every (framework, layer) runs in its own worker subprocess (the torch ones under
``--torch_python``), built and warmed up first; then ``--rounds`` rounds in which each worker in
turn times ``--steps`` steps, so background load on this shared machine hits all rows alike.
Reported: median step time over all timed steps, tokens/s, and peak memory as

* ``step RSS``: peak resident set size of the worker over warm-up and all timed steps
  (``VmHWM``, reset just before the first step, once parameters and input exist) minus the RSS
  at that moment — the same method in both frameworks: gradients + activations/temporaries +
  allocator overhead of a step. ``peak`` = parameter bytes + step RSS;
* ``xla``: for JAX also the compiled step's ``memory_analysis()``, temp + arguments (+ outputs,
  i.e. the gradients, shown separately).

``--malloc tuned`` runs every worker with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2**36``: glibc then keeps freed memory instead of returning it with
munmap, so fresh multi-MiB buffers (JAX's outputs and temporaries, torch's tensors) stop paying
a page fault per 4 KiB page — on this VM that is ~16k faults and ~30-60 ms per 64 MiB buffer,
more than the memory traffic itself. ``--malloc thp`` instead sets
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (transparent huge pages for large allocations: 512×
fewer faults). Either applies to both frameworks equally; the default run is the untuned
environment. (The RSS columns are only meaningful in the default and thp runs: the tuned
allocator keeps freed memory.)

Matching PEER-pytorch to the paper's layer as closely as it allows: ``non_competing_scores=False``
(softmax over the top-k; its default is ReLU scores with top-1 per head),
``num_experts_per_head = product_key_topk = 16``, ``dim_key = 64`` (its query has 2·dim_key per
head: d_key = 128), ``activation = GELU(approximate='tanh')`` (jax.nn.gelu's default; its own
default is exact erf GELU), no pre-RMSNorm, no dropout. Differences that remain: it has
**per-head sub-keys** (the paper shares one key set across heads; same FLOPs) and **no query
BatchNorm** (less work); it keeps the ``[tokens, h, k, d]`` gathers of u and v for its backward
pass (fewer gathers, far more memory); both return dense table gradients. The row
``peer_jax per-head keys, no BN`` runs peer_jax with ``per_head_keys=True,
query_batchnorm=False``: the same computation as PEER-pytorch (apples to apples).
Initialisations differ (irrelevant to speed); both run in float32.

A roofline (benchmarks/roofline.py) is measured in the same run and printed under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# The PyTorch side, pinned. "+cpu" is the CPU-only build (no CUDA wheel can satisfy it).
TORCH_PIN = "torch==2.13.0+cpu"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PEER_PYTORCH_PIN = "peer-pytorch==0.2.2"
PEER_PYTORCH_DEPS = ("einops==0.8.2", "einx==0.4.3")


def install_torch_side(torch_python: str) -> None:
    """Creates the venv that ``torch_python`` belongs to and installs the pinned PyTorch side."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(torch_python)))
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q"]

    def run(cmd):
        print("...", " ".join(cmd), file=sys.stderr, flush=True)
        return subprocess.run(cmd).returncode == 0

    if not run([sys.executable, "-m", "venv", venv]):
        raise SystemExit(f"could not create {venv}")
    if not (run(pip + [TORCH_PIN]) or run(pip + ["--index-url", TORCH_CPU_INDEX, TORCH_PIN])):
        raise SystemExit(f"could not install {TORCH_PIN} into {venv} (offline? see --help for the manual steps)")
    if not (run(pip + ["--no-deps", PEER_PYTORCH_PIN]) and run(pip + list(PEER_PYTORCH_DEPS))):
        raise SystemExit(f"could not install {PEER_PYTORCH_PIN} and its dependencies into {venv}")
MALLOC_ENVS = {
    "default": {},
    "tuned": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36)},
    "thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    """Current RSS, after resetting the peak-RSS mark to it (Linux ≥ 4.0: clear_refs 5).

    getrusage's ru_maxrss is no use in a subprocess: Linux carries the parent's RSS at fork into
    the child's maxrss across exec. VmHWM (the peak of this process image) is, once reset here.
    """
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _maxrss_bytes() -> int:
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _emit(obj) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- workers


def _jax_worker(spec: dict):
    import gc

    from peer_jax import runtime

    # What `python -m peer_jax.train` does on CPU (peer_jax/runtime.py), unless --malloc set the
    # allocator for both frameworks through the environment.
    allocator = runtime.configure_malloc("auto" if spec.get("malloc", "default") == "default" else "system")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from peer_jax.layers.peer import PEER

    d, tokens, seq = spec["d"], spec["tokens"], spec["seq_len"]

    if spec["layer"] == "dense":
        class Dense(nnx.Module):
            def __init__(self, rngs):
                self.up = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
                self.down = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)

            def __call__(self, x, train=True):
                return self.down(jax.nn.gelu(self.up(x)))

        def factory():
            return Dense(nnx.Rngs(0))
    else:
        kw = dict(num_experts=spec["N"], heads=spec["heads"], top_k=spec["top_k"], d_key=spec["d_key"],
                  per_head_keys=spec["per_head_keys"], query_batchnorm=spec["query_bn"], **spec.get("peer_kw", {}))

        def factory():
            return PEER(d, rngs=nnx.Rngs(0), **kw)

    gdef, abs_state = nnx.split(nnx.eval_shape(factory))

    def step(state, x):
        m = nnx.merge(gdef, state)
        grads = nnx.grad(lambda m, x: jnp.mean(jnp.square(m(x, train=True).astype(jnp.float32))), argnums=(0, 1))(m, x)
        return grads, nnx.state(m, nnx.BatchStat)

    x_abs = jax.ShapeDtypeStruct((tokens // seq, seq, d), jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(abs_state, x_abs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    init = jax.jit(lambda: nnx.split(factory())[1]).lower().compile()  # compiled before the baseline, too
    x_host = np.random.default_rng(0).standard_normal(x_abs.shape).astype(np.float32)
    state = init()
    x = jnp.asarray(x_host)
    jax.block_until_ready((state, x))
    del x_host
    gc.collect()
    base = _rss_bytes()  # parameters and input allocated: what follows is the step's own memory

    def run():
        jax.block_until_ready(compiled(state, x))

    info = {"compile_s": compile_s, "allocator": allocator, "xla_temp_bytes": int(mem.temp_size_in_bytes),
            "xla_argument_bytes": int(mem.argument_size_in_bytes), "xla_output_bytes": int(mem.output_size_in_bytes),
            "params": int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(nnx.merge(gdef, state), nnx.Param)))),
            "param_bytes": int(sum(v.nbytes for v in jax.tree.leaves(nnx.state(nnx.merge(gdef, state), nnx.Param))))}
    del abs_state
    return run, base, info


def _torch_worker(spec: dict):
    import torch
    from torch import nn

    torch.manual_seed(0)
    d, tokens, seq = spec["d"], spec["tokens"], spec["seq_len"]
    if spec["layer"] == "dense":
        model = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(approximate="tanh"),
                              nn.Linear(4 * d, d, bias=False))
    else:
        from PEER_pytorch import PEER

        model = PEER(dim=d, heads=spec["heads"], num_experts=spec["N"], num_experts_per_head=spec["top_k"],
                     dim_key=spec["d_key"] // 2, non_competing_scores=False,
                     activation=lambda: nn.GELU(approximate="tanh"))
    model.train()
    x = torch.randn(tokens // seq, seq, d, requires_grad=True)
    params = list(model.parameters())
    base = _rss_bytes()  # parameters and input allocated: what follows is the step's own memory

    def run():
        for p in params:  # fresh gradients every step, like a functional JAX step (torch's default
            p.grad = None  # zero_grad(set_to_none=True))
        x.grad = None
        y = model(x)
        y.float().square().mean().backward()

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "params": int(sum(p.numel() for p in params)),
            "param_bytes": int(sum(p.numel() * p.element_size() for p in params))}
    return run, base, info


def worker_main(spec: dict) -> int:
    run, base, info = (_torch_worker if spec["framework"] == "torch" else _jax_worker)(spec)
    for _ in range(spec["warmup"]):
        run()
    _emit({"ready": True, "rss_base_bytes": base, **info})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "exit":
            break
        walls, cpus = [], []
        for _ in range(int(cmd[1])):
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        _emit({"wall": walls, "cpu": cpus})
    _emit({"maxrss_bytes": _maxrss_bytes(), "rss_base_bytes": base})
    return 0


# ----------------------------------------------------------------------------- orchestration


class Worker:
    def __init__(self, name: str, spec: dict, python: str, env: dict):
        self.name, self.spec = name, spec
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.walls, self.cpus = [], []
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()}); run it alone to see why")

    def time(self, steps: int) -> None:
        self.proc.stdin.write(f"time {steps}\n")
        self.proc.stdin.flush()
        out = self._read()
        self.walls += out["wall"]
        self.cpus += out["cpu"]

    def close(self) -> None:
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        self.info.update(self._read())
        self.proc.wait()


def _variants(d: int, n: int, args, ref_src: str | None) -> list[tuple[str, dict, str]]:
    """(name, spec, framework) rows for one size."""
    common = dict(d=d, N=n, heads=args.heads, top_k=args.top_k, d_key=args.d_key, tokens=args.tokens,
                  seq_len=args.seq_len, warmup=args.warmup, malloc=args.malloc)
    rows = [("peer_jax (paper: shared keys, query BN)", dict(common, layer="peer", per_head_keys=False, query_bn=True),
             "jax"),
            ("peer_jax per-head keys, no BN", dict(common, layer="peer", per_head_keys=True, query_bn=False), "jax")]
    if not args.skip_native:  # compute="native": the C++ kernels of peer_jax.native (XLA FFI)
        native = {"compute": "native"}
        rows += [("peer_jax native (paper)", dict(common, layer="peer", per_head_keys=False, query_bn=True,
                                                  peer_kw=native), "jax"),
                 ("peer_jax native per-head, no BN", dict(common, layer="peer", per_head_keys=True, query_bn=False,
                                                          peer_kw=native), "jax")]
    if ref_src:
        rows.append((f"peer_jax@{args.ref} (paper)", dict(common, layer="peer", per_head_keys=False, query_bn=True,
                                                          src=ref_src), "jax"))
    if not args.skip_torch:
        rows.append(("PEER-pytorch 0.2.2", dict(common, layer="peer"), "torch"))
    rows.append(("dense FFW 4d (jax)", dict(common, layer="dense"), "jax"))
    if not args.skip_torch:
        rows.append(("dense FFW 4d (torch)", dict(common, layer="dense"), "torch"))
    if args.only:
        rows = [r for r in rows if re.search(args.only, r[0])]
    return [(name, dict(spec, framework=fw), fw) for name, spec, fw in rows]


@contextlib.contextmanager
def _ref_checkout(ref: str | None):
    """The peer_jax package of git `ref`, exported read-only (git archive) to a temp dir."""
    if not ref:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="peer_ref_") as tmp:
        archive = subprocess.run(["git", "archive", ref, "peer_jax"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield tmp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256:65536,512:262144", help="comma-separated d_model:num_experts")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--top_k", type=int, default=16)
    p.add_argument("--d_key", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per worker per round")
    p.add_argument("--malloc", choices=tuple(MALLOC_ENVS), default="default")
    p.add_argument("--torch_python", default=os.path.join(REPO, ".venv-bench", "bin", "python"))
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--no_install", action="store_true",
                   help="fail instead of creating --torch_python's venv when it does not exist")
    p.add_argument("--skip_native", action="store_true", help="leave out the compute='native' rows")
    p.add_argument("--only", default=None, help="regex: run only the rows whose name matches (every worker of a "
                   "size is alive at once; with --malloc tuned, which keeps freed memory, 7 workers at d=512 "
                   "exceed 24 GiB)")
    p.add_argument("--ref", default=None, help="also time the PEER layer of this git ref (e.g. HEAD)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/peer_vs_pytorch[_tuned].json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if not args.skip_torch and not os.path.exists(args.torch_python):
        if args.no_install:
            p.error(f"--torch_python {args.torch_python} not found: install the PyTorch side (see --help) or "
                    "--skip_torch")
        install_torch_side(args.torch_python)
    suffix = "" if args.malloc == "default" else f"_{args.malloc}"
    out_path = args.out or os.path.join(HERE, "results", f"peer_vs_pytorch{suffix}.json")

    sys.path.insert(0, HERE)
    import jax

    import roofline

    env = dict(os.environ, **MALLOC_ENVS[args.malloc])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    machine = roofline.measure_machine()
    load_before = os.getloadavg()
    results = []
    with _ref_checkout(args.ref) as ref_src:
        for size in args.sizes.split(","):
            d, n = (int(v) for v in size.split(":"))
            workers = []
            for name, spec, fw in _variants(d, n, args, ref_src):
                print(f"... d={d} N={n}: starting {name}", file=sys.stderr, flush=True)
                wenv = dict(env)
                if spec.get("src"):
                    wenv["PYTHONPATH"] = spec["src"] + os.pathsep + env.get("PYTHONPATH", "")
                workers.append(Worker(name, spec, args.torch_python if fw == "torch" else sys.executable, wenv))
            for r in range(args.rounds):
                order = workers[r % len(workers):] + workers[: r % len(workers)]
                for w in order:
                    w.time(args.steps)
                print(f"... d={d}: round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr,
                      flush=True)
            for w in workers:
                w.close()
                med = statistics.median(w.walls)
                row = {"name": w.name, "d_model": d, "num_experts": n, "framework": w.spec["framework"],
                       "layer": w.spec["layer"], "spec": w.spec, "step_s_median": med, "step_s_all": w.walls,
                       "cpu_s_median": statistics.median(w.cpus), "tokens_per_s": args.tokens / med,
                       "peak_rss_delta_bytes": w.info["maxrss_bytes"] - w.info["rss_base_bytes"], **w.info}
                row["peak_bytes"] = row["param_bytes"] + row["peak_rss_delta_bytes"]
                if w.spec["framework"] == "jax":
                    row["xla_temp_args_bytes"] = row["xla_temp_bytes"] + row["xla_argument_bytes"]
                if w.spec["layer"] == "peer":
                    row["roofline"] = roofline.report(d, n, args.tokens, machine, med, heads=args.heads,
                                                      top_k=args.top_k, d_key=args.d_key)
                results.append(row)
    machine_after = roofline.measure_machine()
    for k in ("bandwidth_bytes_per_s", "matmul_flops_per_s"):
        machine[k + "_after"] = machine_after[k]
    load_after = os.getloadavg()

    # ---------------------------------------------------------------- table
    mib = 2**20
    print(f"\nPEER layer forward+backward, {args.tokens} tokens/step, h={args.heads}, k={args.top_k}, "
          f"d_key={args.d_key}, float32; {platform.processor() or platform.machine()} × {os.cpu_count()} cores; "
          f"malloc {args.malloc}; load average before/after {load_before[0]:.1f}/{load_after[0]:.1f}")
    head = (f"{'d':>4} {'N':>7}  {'layer':<40}{'step ms':>9}{'cpu ms':>9}{'tokens/s':>10}{'params':>8}{'step RSS':>9}"
            f"{'peak':>7}{'XLA t+a':>9}{'(+out)':>8}{'× torch':>9}{'mem ×':>7}{'roofline':>9}")
    print(head)
    print("-" * len(head))
    ratios = {}
    for d_n in dict.fromkeys((r["d_model"], r["num_experts"]) for r in results):
        rows = [r for r in results if (r["d_model"], r["num_experts"]) == d_n]
        torch_peer = next((r for r in rows if r["framework"] == "torch" and r["layer"] == "peer"), None)
        torch_dense = next((r for r in rows if r["framework"] == "torch" and r["layer"] == "dense"), None)
        for r in rows:
            ref = torch_peer if r["layer"] == "peer" else torch_dense
            speed = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
            mem = r["peak_bytes"] / ref["peak_bytes"] if ref else float("nan")
            if ref is not None and r is not ref:
                ratios[f"d{d_n[0]}: {r['name']} vs {ref['name']}"] = {"tokens_per_s_ratio": speed,
                                                                       "peak_memory_ratio": mem}
            xla = (f"{r['xla_temp_args_bytes'] / mib:>9.0f}{r['xla_output_bytes'] / mib:>8.0f}"
                   if "xla_temp_args_bytes" in r else f"{'-':>9}{'-':>8}")
            roof = f"{100 * r['roofline']['fraction_of_roofline']:>8.0f}%" if "roofline" in r else f"{'-':>9}"
            print(f"{d_n[0]:>4} {d_n[1]:>7}  {r['name']:<40}{1e3 * r['step_s_median']:>9.1f}{1e3 * r['cpu_s_median']:>9.1f}"
                  f"{r['tokens_per_s']:>10.0f}{r['param_bytes'] / mib:>8.0f}{r['peak_rss_delta_bytes'] / mib:>9.0f}"
                  f"{r['peak_bytes'] / mib:>7.0f}{xla}{speed:>9.2f}{mem:>7.2f}{roof}")
    print("\nMemory in MiB. × torch: tokens/s relative to PEER-pytorch (PEER rows) or to the torch dense FFW (dense "
          "rows); mem ×: peak relative to the same. cpu ms: process CPU time per step (all threads). step RSS: peak "
          "RSS of the steps above parameters+input; peak = parameters + step RSS; XLA t+a: compiled temp + "
          "arguments, (+out): outputs (the gradients) — see --help.")
    print("Roofline: " + roofline.format_machine(machine))
    for d_n in dict.fromkeys((r["d_model"], r["num_experts"]) for r in results):
        peer_rows = [r for r in results if (r["d_model"], r["num_experts"]) == d_n and r["framework"] == "jax"
                     and r["layer"] == "peer" and "src" not in r["spec"]]
        if peer_rows:  # --only may have left none
            best = min(peer_rows, key=lambda r: r["step_s_median"])
            print("  " + roofline.format_report(best["roofline"]) + f" [{best['name']}]")

    out = {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "machine": machine,
           "jax": jax.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "loadavg_1min_before_after": [load_before[0], load_after[0]], "results": results, "ratios": ratios}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
