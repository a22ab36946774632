"""What a decoded token costs: PEER and PKM against the dense FFW they replace, at paper size.

  python benchmarks/decode.py                      # layer and model level, ~15 min on 2 idle CPU cores
  python benchmarks/decode.py --skip_model          # layer level only

**Layer level.** One eval-mode forward of one layer (query BatchNorm on running statistics)
over ``[batch, 1, d]`` (a decode step) at batch 1, 8 and 64: PEER (d = 1280, N = 1024², h = 8,
k = 16, d_key = 128), PKM (configs/models/pkm.gin: N = 1024², h = 8, k = 32, d_key = 128) and
the dense FFW (d = 1280, hidden 4·d). Each layer is timed on its default path (for PEER/PKM:
the decode path of ``layers/expert_decode.py``, whose table reads are the token-centric native
kernels where they build, ``backends.decode_ops``) and, for PEER/PKM, on the decode path with
the XLA gather instead of those kernels and on the training read-out
(``decode_gather_max_tokens=0``) with ``compute='efficient'`` and ``'native'``. Latency is the
median over ``--repeats`` rounds; within a round every candidate of a group runs once, in turn
(interleaved), so load changes hit all of them alike. Groups, each holding the dense FFW too so
its ratios are same-time ratios: float32 PEER; float32 PKM; bfloat16 PEER + PKM (bf16 params
and compute; the training read-out is not run there, see ``expert_decode``). Each group runs
in its own subprocess (float32 PEER tables are 10.7 GB) and measures the bandwidth there too.

Bytes of parameters read per token are counted from the shapes: the dense FFW reads all
``2·d·4d`` weights once per step (shared by the batch); PEER/PKM read the router (query
projection, BatchNorm, sub-keys) once per step plus, per token, its ``h·k`` rows of each table
(an upper bound: rows two tokens share are counted twice). The bandwidth they are compared to
is measured here: a jitted ``jnp.sum`` over a 1 GiB float32 array (all XLA threads), median of
``--repeats`` runs; "of bw" = bytes read per step / latency / that bandwidth.

**Model level.** Tokens/s of ``peer_jax.sample.generate`` (its prefill and KV-cached one-token
steps) on the paper's 2e19 L16 d1280 h20 shapes (vocab 32000, scanned layers, the sparse FFW in
the middle block), bfloat16 parameters and compute, parameters filled with hashed uniform
values of the initialisers' scales (no random-number generation over 2.7·10⁹ entries): batch
1 and 64, prompts of ``--prompt_len`` tokens, ``--new_tokens`` new tokens. Each (model, batch)
case runs in its own subprocess (peak memory: one model), with the system allocator unless
``$PEER_JAX_MALLOC`` says otherwise; ``generate`` is called once to compile and once timed,
minus the compile time JAX reports for that call (jax.monitoring). The cases run one after
another, every case once per round (``--model_rounds``, order reversed every other round); a
case's tokens/s is its median over the rounds, its ratio the median of its per-round ratios to
the dense model. Parameters are put on 2 MiB pages first (``runtime.huge_pages``), as the sample
CLI does; the layer groups are timed on 4 KiB pages and then on 2 MiB pages, in one process.

Writes the table to stdout and JSON to ``--out``; ``uptime`` before and after is recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from peer_jax import runtime  # noqa: E402

runtime.configure_malloc()  # $PEER_JAX_MALLOC or auto (tuned on CPU), before JAX starts its threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from peer_jax import backends  # noqa: E402
from peer_jax.layers.dense import DenseFFW  # noqa: E402
from peer_jax.layers.peer import PEER  # noqa: E402
from peer_jax.layers.pkm import PKM  # noqa: E402

D = 1280
PAPER = {"peer": dict(num_experts=1024**2, heads=8, top_k=16, d_key=128),
         "pkm": dict(num_experts=1024**2, heads=8, top_k=32, d_key=128)}
LAYERS = {"peer": PEER, "pkm": PKM}
MODEL = dict(num_layers=16, d_model=D, num_heads=20, scan_layers=True, sparse_blocks="middle")
VOCAB = 32000
BATCHES = (1, 8, 64)


# ----------------------------------------------------------------------------- parameters


def _hash_fill(shape, dtype, seed: int, std: float):
    """Uniform values of standard deviation ``std`` from an integer hash of each index: one
    elementwise pass, no temporaries beyond the output (a 1024²×1280 table is 5.4 GB)."""
    def fill():
        flat = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
        for ax in range(1, len(shape)):
            flat = flat * jnp.uint32(shape[ax]) + jax.lax.broadcasted_iota(jnp.uint32, shape, ax)
        h = flat * jnp.uint32(0x9E3779B1) + jnp.uint32((seed * 0x85EBCA77 + 1) % (1 << 32))
        h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)
        h = (h ^ (h >> 12)) * jnp.uint32(0x297A2D39)
        h = h ^ (h >> 15)
        u = (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24)) - 0.5
        return (u * (std * math.sqrt(12.0))).astype(dtype)

    return jax.jit(fill)()


def _leaf_value(path, leaf, seed: int):
    name = [k.key for k in path if hasattr(k, "key")][-1]
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.zeros(leaf.shape, leaf.dtype)
    if name in ("scale", "var"):
        return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean"):
        return jnp.zeros(leaf.shape, leaf.dtype)
    if name in ("u", "v", "values", "sub_keys"):  # row tables: N(0, 1/width) initialisers
        std = 1.0 / math.sqrt(leaf.shape[-1])
    elif name == "embed":
        std = 1.0
    else:  # projections [..., fan_in, fan_out]
        std = 1.0 / math.sqrt(leaf.shape[-2])
    return _hash_fill(leaf.shape, leaf.dtype, seed, std)


def filled_state(abstract_state):
    """Concrete values for an abstract nnx state, leaf by leaf (peak memory: the state)."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    values = [_leaf_value(path, leaf, i) for i, (path, leaf) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(jax.tree.structure(abstract_state), values)


# ----------------------------------------------------------------------------- layer level


def bandwidth(repeats: int) -> dict:
    a = _hash_fill((256, 1 << 20), jnp.float32, 0, 1.0)  # 1 GiB
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        total(a).block_until_ready()
        times.append(time.perf_counter() - t)
    del a
    s = statistics.median(times)
    return {"method": "jitted jnp.sum over a 1 GiB float32 array, median", "bytes": 1 << 30,
            "seconds": s, "GBps": (1 << 30) / s / 1e9}


def read_bytes(name: str, batch: int, itemsize: int) -> int:
    """Bytes of parameters one decode step of ``batch`` tokens reads (see the module doc)."""
    if name == "dense":
        return 2 * D * 4 * D * itemsize
    p = PAPER[name]
    n, h, dk = math.isqrt(p["num_experts"]), p["heads"], p["d_key"]
    router = D * h * dk + 4 * h * dk + 2 * n * (dk // 2)
    rows = (2 if name == "peer" else 1) * h * p["top_k"] * D
    return (router + batch * rows) * itemsize


def build_group(kind: str, dtype) -> dict:
    """Candidates ``name -> (layer kind, jitted f(state, x), state)`` sharing one set of tables."""
    dense_abs = nnx.eval_shape(lambda: DenseFFW(D, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    gdef, abstract = nnx.split(dense_abs)
    out = {"dense": ("dense", gdef, filled_state(abstract))}
    for layer in (["peer", "pkm"] if kind == "both" else [kind]):
        # The default decode path: the native token-centric kernels where they build here, else
        # the XLA gather (backends.decode_ops); the XLA gather is also timed on its own.
        default = "native kernels" if backends.decode_ops() is backends.DECODE_NATIVE else "XLA gather"
        variants = {f"{layer} decode {default} (default)": {}}
        if default != "XLA gather":
            variants[f"{layer} decode XLA gather"] = dict(gather_ops=backends.ops("naive"))
        if dtype == jnp.float32:
            variants[f"{layer} efficient"] = dict(decode_gather_max_tokens=0)
            variants[f"{layer} native"] = dict(decode_gather_max_tokens=0, compute="native")
        state = None
        for vname, kw in variants.items():
            kw = dict(kw)
            gather_ops = kw.pop("gather_ops", None)
            model = nnx.eval_shape(lambda layer=layer, kw=kw: LAYERS[layer](
                D, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, **PAPER[layer], **kw))
            if gather_ops is not None:  # the decode path's table reads, swapped before splitting
                model.gather_ops = gather_ops
            gdef, abstract = nnx.split(model)
            state = filled_state(abstract) if state is None else state
            out[vname] = (layer, gdef, state)
    return {k: (layer, jax.jit(lambda s, x, g=g: nnx.merge(g, s)(x, train=False)), s)
            for k, (layer, g, s) in out.items()}


def time_group(cands: dict, dtype, repeats: int) -> list[dict]:
    rows = []
    for b in BATCHES:
        x = _hash_fill((b, 1, D), dtype, 7 + b, 1.0)
        live = {}
        loops = {}
        for name, (layer, f, s) in cands.items():
            try:
                loops[name] = "while" in f.lower(s, x).as_text()
                f(s, x).block_until_ready()
                live[name] = (layer, f, s)
            except Exception as e:  # e.g. the native kernels do not build here
                rows.append({"candidate": name, "batch": b, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        times = {k: [] for k in live}
        for _ in range(repeats):
            for name, (_, f, s) in live.items():
                t = time.perf_counter()
                f(s, x).block_until_ready()
                times[name].append(time.perf_counter() - t)
        dense = statistics.median(times["dense"])
        for name, (layer, _, _) in live.items():
            med = statistics.median(times[name])
            rows.append({"candidate": name, "layer": layer, "batch": b, "dtype": jnp.dtype(dtype).name,
                         "median_ms": med * 1e3, "min_ms": min(times[name]) * 1e3, "vs_dense": med / dense,
                         "has_loop": loops[name],
                         "bytes_per_step": read_bytes(layer, b, jnp.dtype(dtype).itemsize)})
    return rows


def bf16_training_path_temp() -> dict:
    """Compiled temporaries of PEER's training read-out on bfloat16 tables (compiled, not run)."""
    out = {}
    for max_tokens, label in ((0, "efficient"), (256, "decode path")):
        g, abstract = nnx.split(nnx.eval_shape(lambda m=max_tokens: PEER(
            D, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, decode_gather_max_tokens=m,
            **PAPER["peer"])))
        f = jax.jit(lambda s, x, g=g: nnx.merge(g, s)(x, train=False))
        mem = f.lower(abstract, jax.ShapeDtypeStruct((64, 1, D), jnp.bfloat16)).compile().memory_analysis()
        out[label] = mem.temp_size_in_bytes
    return out


GROUPS = {"peer_float32": ("peer", jnp.float32), "pkm_float32": ("pkm", jnp.float32),
          "bfloat16": ("both", jnp.bfloat16)}


def layer_group(group: str, repeats: int) -> dict:
    """One interleaved group, with the bandwidth measured in the same process. Runs in a
    subprocess: XLA:CPU's freed tables stay in the (tuned) heap, so groups must not share one."""
    kind, dtype = GROUPS[group]
    bw = bandwidth(repeats)
    cands = build_group(kind, dtype)
    rows = [{**r, "pages": "4 KiB"} for r in time_group(cands, dtype, repeats)]
    # Then the same candidates with every parameter array on 2 MiB pages (what peer_jax.sample
    # does on CPU): same process, same tables, dense included.
    pages = runtime.huge_pages([s for (_, _, s) in cands.values()])
    rows += [{**r, "pages": "2 MiB"} for r in time_group(cands, dtype, repeats)]
    for r in rows:
        r["group"] = group
        if "median_ms" in r:
            r["of_bandwidth"] = r["bytes_per_step"] / (r["median_ms"] / 1e3) / (bw["GBps"] * 1e9)
    out = {"group": group, "bandwidth": bw, "rows": rows, "huge_pages": pages,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if group == "bfloat16":
        out["bf16_peer_temp_bytes_batch64"] = bf16_training_path_temp()
    return out


def _subprocess_json(args: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-600:]}
    return json.loads(lines[-1])


def layer_level(repeats: int, common: list[str]) -> list[dict]:
    out = []
    for group in GROUPS:
        r = _subprocess_json(["--layer_group", group, "--repeats", str(repeats), *common])
        r.setdefault("group", group)
        out.append(r)
        if "error" in r:
            print(f"\nlayer group {group}: {r['error']}", flush=True)
        else:
            print_layer(r["rows"], r["bandwidth"])
    return out


def print_layer(rows, bw):
    print(f"\nlayer decode step (T = 1), memory bandwidth {bw['GBps']:.1f} GB/s ({bw['method']})")
    print(f"{'candidate':34s} {'dtype':9s} {'pages':>5s} {'batch':>5s} {'median ms':>10s} {'vs dense':>9s} "
          f"{'MB/token':>9s} {'of bw':>6s} loop")
    for r in rows:
        if "error" in r:
            print(f"{r['candidate']:34s} batch {r['batch']}: {r['error']}")
            continue
        print(f"{r['candidate']:34s} {r['dtype']:9s} {r['pages']:>5s} {r['batch']:5d} {r['median_ms']:10.2f} {r['vs_dense']:8.2f}x "
              f"{r['bytes_per_step'] / r['batch'] / 1e6:9.2f} {r['of_bandwidth']:6.1%} {'yes' if r['has_loop'] else 'no'}",
              flush=True)


# ----------------------------------------------------------------------------- model level


def model_case(ffw: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """One (model, batch) case: tokens/s of ``peer_jax.sample.generate``. Runs in a subprocess."""
    from peer_jax import sample, sharding
    from peer_jax.models.transformer import Transformer
    from peer_jax.training import step as step_lib

    kw = dict(MODEL, dtype="bfloat16", param_dtype="bfloat16")
    if ffw != "dense":
        kw["sparse_ffw"] = functools.partial(LAYERS[ffw], **PAPER[ffw])
    mesh, rules = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), sharding.RULES_DEFAULT
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Transformer(VOCAB, rngs=nnx.Rngs(0), **kw)),
                                           nnx.Param, ...)
        params, rest = filled_state(params), filled_state(rest)
        pages = runtime.huge_pages(params)  # as the sample CLI does on CPU
        setup = step_lib.ModelSetup(graphdef, mesh, rules, {})
        rng = np.random.default_rng(0)
        rows = [rng.integers(2, VOCAB, prompt_len).tolist() for _ in range(batch)]
        # eos_id=-1: no row stops early, so every call decodes exactly new_tokens tokens.
        run = functools.partial(sample.generate, setup, params, rest, rows, new_tokens, vocab_size=VOCAB, eos_id=-1)
        # generate() caches its jitted prefill and step, so the timed second call should not
        # compile; whatever JAX does report compiling in it is subtracted, measured as the union
        # of the intervals it reports (nested traces are not counted twice).
        spans = []
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, secs, **_: spans.append((time.perf_counter() - secs, time.perf_counter()))
            if event.startswith("/jax/core/compile/") else None)
        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
        spans.clear()
        t = time.perf_counter()
        toks, _ = run()
        wall = time.perf_counter() - t
    compile_s, end = 0.0, -math.inf
    for a, b in sorted(spans):
        compile_s += max(0.0, b - max(a, end))
        end = max(end, b)
    n = sum(len(r) for r in toks)
    timed = wall - compile_s
    return {"ffw": ffw, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "tokens": n,
            "wall_s": wall, "compile_s_subtracted": compile_s, "first_call_s": first,
            "tokens_per_s": n / timed, "dtype": "bfloat16 params and compute", "malloc": runtime.configure_malloc(),
            "huge_pages": pages,
            "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def model_level(prompt_len: int, new_tokens: int, common: list[str], rounds: int = 2) -> list[dict]:
    # Each one-token step of a bf16 model allocates a fresh float32 copy of its weights (1.5 GB
    # of temporaries for the dense model); the tuned allocator, which never returns memory, let
    # the RSS of one case climb past 14 GB. The system allocator hands it back after each step.
    env = {"PEER_JAX_MALLOC": os.environ.get("PEER_JAX_MALLOC", "system")}
    # The cases run one after another (each needs the memory of a whole model), so load drift
    # would favour whichever ran when the machine was quieter: every case runs once per round,
    # in reversed order every other round, and a case's figure is its median over the rounds,
    # its ratio the median of the per-round ratios to the dense model.
    out, runs = [], {}
    for batch in (1, 64):
        for rnd in range(rounds):
            for ffw in ("dense", "peer", "pkm")[::1 if rnd % 2 == 0 else -1]:
                r = {"ffw": ffw, "batch": batch, "round": rnd, **_subprocess_json(
                    ["--model_case", ffw, "--batch", str(batch), "--prompt_len", str(prompt_len),
                     "--new_tokens", str(new_tokens), *common], env)}
                runs.setdefault((ffw, batch), []).append(r)
                print(json.dumps(r), flush=True)
        for ffw in ("dense", "peer", "pkm"):
            ok = [r for r in runs[(ffw, batch)] if "tokens_per_s" in r]
            if not ok:
                out.append(runs[(ffw, batch)][-1])
                continue
            dense = {r["round"]: r["tokens_per_s"] for r in runs[("dense", batch)] if "tokens_per_s" in r}
            ratios = [r["tokens_per_s"] / dense[r["round"]] for r in ok if r["round"] in dense]
            out.append({**ok[-1], "round": None, "rounds": [r["tokens_per_s"] for r in ok],
                        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                        "peak_rss_gb": max(r["peak_rss_gb"] for r in ok),
                        **({"vs_dense": statistics.median(ratios), "vs_dense_rounds": ratios} if ratios else {})})
    print(f"\nmodel decode (peer_jax.sample.generate, L{MODEL['num_layers']} d{D} h20, bf16 params), prompt {prompt_len} + "
          f"{new_tokens} new tokens")
    print(f"{'ffw':6s} {'batch':>5s} {'tokens/s':>9s} {'vs dense':>9s} {'params GB':>10s} {'peak RSS GB':>12s}")
    for r in out:
        if "error" in r:
            print(f"{r['ffw']:6s} {r['batch']:5d} error: {r['error'][-200:]}")
        else:
            print(f"{r['ffw']:6s} {r['batch']:5d} {r['tokens_per_s']:9.2f} {r.get('vs_dense', 1.0):8.2f}x "
                  f"{r['param_bytes'] / 1e9:10.2f} {r['peak_rss_gb']:12.2f}")
    return out


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--prompt_len", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=24)
    ap.add_argument("--skip_layer", action="store_true")
    ap.add_argument("--skip_model", action="store_true")
    ap.add_argument("--model_rounds", type=int, default=2, help="rounds of the model cases (median over rounds)")
    ap.add_argument("--out", default="benchmarks/results/decode/decode.json")
    ap.add_argument("--model_case", choices=["dense", "peer", "pkm"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--layer_group", choices=list(GROUPS), help=argparse.SUPPRESS)
    ap.add_argument("--num_experts", type=int, default=1024**2, help="PEER/PKM N (smaller for a smoke run)")
    ap.add_argument("--num_layers", type=int, default=16, help="model depth (smaller for a smoke run)")
    args = ap.parse_args(argv)
    for p in PAPER.values():
        p["num_experts"] = args.num_experts
    MODEL["num_layers"] = args.num_layers
    if args.model_case:
        runtime.configure_compilation_cache(os.path.join(tempfile.gettempdir(), "peer_jax_decode_bench_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        print(json.dumps(model_case(args.model_case, args.batch, args.prompt_len, args.new_tokens)))
        return 0
    if args.layer_group:
        print(json.dumps(layer_group(args.layer_group, args.repeats)))
        return 0
    if args.repeats < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        ap.error("--repeats ≥ 1, --prompt_len ≥ 1 and --new_tokens ≥ 2 are required.")
    result = {"uptime_before": _uptime(), "platform": platform.platform(), "cpus": os.cpu_count(),
              "jax": jax.__version__, "args": vars(args)}
    common = ["--num_experts", str(args.num_experts), "--num_layers", str(args.num_layers)]
    if not args.skip_layer:
        result["layer"] = layer_level(args.repeats, common)
    if not args.skip_model:
        result["model"] = model_level(args.prompt_len, args.new_tokens, common, args.model_rounds)
    result["uptime_after"] = _uptime()
    result["peak_rss_gb"] = {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                             "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nuptime before: {result['uptime_before']}\nuptime after:  {result['uptime_after']}\n"
          f"peak RSS GB: {result['peak_rss_gb']}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
