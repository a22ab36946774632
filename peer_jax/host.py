"""The machine a run ran on, and pinning what XLA:CPU would otherwise choose per machine.

XLA:CPU compiles for the CPU it finds, so the same program on the same inputs can give
different bits on another x86-64 host (docs/reproducibility.md has the measurements):

* its LLVM code generator uses every instruction the CPU has (FMA from AVX2 on changes
  rounding), unless ``--xla_cpu_max_isa`` caps it;
* its YNNPACK library fusions (matmuls, reductions) pick their kernels from the CPU's features
  at run time and ignore that cap;
* its intra-op thread pool has one thread per usable CPU, and how a reduction or a matmul is
  split between the threads changes its rounding.

``pin_xla_cpu(level)`` (``config.TrainConfig.xla_cpu_pin``) caps code generation at ``level``
and turns the YNNPACK fusions off (matmuls then run in XLA's Eigen runtime, compiled into
jaxlib for one ISA); ``pin_threads(n)`` (``config.TrainConfig.xla_cpu_threads``) limits the
process to n CPUs, so the pool has n threads on any host. Together they remove what the ISA
and the core count change. What they cannot pin: the matmul libraries also size their blocks
from the CPU's caches, so on another CPU model a pinned run can still differ in the last bit of
a few values (docs/reproducibility.md has the measurements). XLA reads ``XLA_FLAGS`` and
sizes its pool once, when the JAX backend starts: the pins must come first, and they fail with
one line if the backend already runs without them. They change only XLA:CPU (and the CPUs
the process may use), so on TPU/GPU runs, whose computation never runs on XLA:CPU, they change
nothing but the host threads.

``describe()`` is the ``host`` entry of compile_report.json, result.json and summary.json;
``differences(a, b)`` names what differs between two of them.
"""

from __future__ import annotations

import os
import platform
import re
import socket

# The levels XLA:CPU's --xla_cpu_max_isa accepts, lowest first, with the Linux /proc/cpuinfo
# flags a CPU needs for each (XLA's AVX2 level includes FMA).
ISA_LEVELS: dict[str, tuple[str, ...]] = {
    "SSE4_2": ("sse4_2",),
    "AVX": ("avx",),
    "AVX2": ("avx2", "fma"),
    "AVX512": ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX": ("amx_tile", "amx_bf16", "amx_int8"),
    "AMX_FP16": ("amx_fp16",),
}
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
_MAX_ISA = re.compile(r"--xla_cpu_max_isa=(\S*)")
_YNN = re.compile(r"--xla_cpu_experimental_ynn_fusion_type=(\S*)")


class PinError(ValueError):
    """The pin cannot be applied (bad level, a CPU without it, conflicting XLA_FLAGS): one line."""


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux /proc/cpuinfo); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_isa(flags: set[str] | None = None) -> str | None:
    """The highest --xla_cpu_max_isa level this CPU has (None: not x86-64 or flags unknown)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    best = None
    for level, needs in ISA_LEVELS.items():  # each level needs the ones below it as well
        if not flags.issuperset(needs):
            break
        best = level
    return best


def pin_flags(level: str) -> list[str]:
    return [f"--xla_cpu_max_isa={level}", NO_YNN]


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def pin_threads(threads: int | None, setting: str = "TrainConfig.xla_cpu_threads") -> None:
    """Limits this process to its first `threads` usable CPUs before the JAX backend starts, so
    that XLA:CPU's intra-op pool has exactly `threads` threads on any host (None: all CPUs).

    The pool's size decides how reductions and matmuls are split between threads, and so their
    rounding. Raises PinError if fewer CPUs are usable or the backend already runs otherwise."""
    if threads is None or not hasattr(os, "sched_getaffinity"):
        return
    usable = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(usable):
        raise PinError(f"{setting}={threads}: this process may use {len(usable)} CPU(s); pin at most that many "
                       f"threads (a run pinned to {threads} needs a host with at least {threads} CPUs), or set "
                       f"{setting}=None.")
    if len(usable) == threads:
        return
    if _backend_started():
        raise PinError(f"{setting}={threads} must be applied before JAX's backend starts, but it already runs with "
                       f"{len(usable)} CPUs; start a fresh process (python -m peer_jax.train applies it first).")
    os.sched_setaffinity(0, usable[:threads])  # XLA:CPU sizes its pool from the CPUs it may use


def pin_xla_cpu(level: str | None, setting: str = "TrainConfig.xla_cpu_pin") -> None:
    """Adds the pin's flags to XLA_FLAGS before the JAX backend starts (None: does nothing).

    Raises PinError for an unknown level, a CPU without it, XLA_FLAGS that set the same flags
    otherwise, or a backend already started without the pin."""
    if level is None:
        return
    if level not in ISA_LEVELS:
        raise PinError(f"{setting}={level!r} is not an XLA:CPU ISA level; use one of {list(ISA_LEVELS)} "
                       "(or None: no pin).")
    have = best_isa()
    if have is not None and list(ISA_LEVELS).index(have) < list(ISA_LEVELS).index(level):
        missing = sorted(set().union(*list(ISA_LEVELS.values())[:list(ISA_LEVELS).index(level) + 1]) - cpu_flags())
        raise PinError(f"{setting}={level!r}: this CPU ({cpu_model()}) lacks {', '.join(missing)} and would "
                       f"compute different bits; run on a CPU with {level}, or pin a lower level (at most {have}).")
    flags = os.environ.get("XLA_FLAGS", "")
    for pattern, want in ((_MAX_ISA, level), (_YNN, "")):
        found = pattern.findall(flags)
        if found and found[-1] != want:
            raise PinError(f"{setting}={level!r} conflicts with XLA_FLAGS={flags!r}; remove "
                           f"{pattern.pattern.split('=')[0]} from XLA_FLAGS (the pin sets it), or set {setting}=None.")
    wanted = pin_flags(level)
    if all(f in flags.split() for f in wanted):
        return
    if _backend_started():
        raise PinError(f"{setting}={level!r} must be applied before JAX's backend starts, but it already runs with "
                       f"XLA_FLAGS={flags!r}; start a fresh process (python -m peer_jax.train applies the pin first) "
                       f"or set XLA_FLAGS='{' '.join(wanted)}' before importing jax.")
    os.environ["XLA_FLAGS"] = " ".join([flags, *wanted]).strip()


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("jax", "jaxlib", "flax"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def pin(cfg) -> None:
    """Applies a TrainConfig's `xla_cpu_pin` and `xla_cpu_threads` (before the backend starts)."""
    pin_xla_cpu(cfg.xla_cpu_pin)
    pin_threads(cfg.xla_cpu_threads)


def describe(pin: str | None = None) -> dict:
    """This process's host: CPU, the ISA XLA:CPU compiles for, threads, platform, versions."""
    import jax

    best = best_isa()
    flags = os.environ.get("XLA_FLAGS", "")
    cap = (_MAX_ISA.findall(flags) or [None])[-1]
    devices = jax.devices()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_isa": best,  # the highest level the CPU offers
        # what XLA:CPU generates code for: the cap (the pin or XLA_FLAGS), else everything the CPU has
        "xla_cpu_isa": cap or best,
        "xla_cpu_pin": pin,
        "cpu_count": os.cpu_count(),
        # XLA:CPU sizes its intra-op thread pool from the CPUs this process may run on
        # (TrainConfig.xla_cpu_threads limits them)
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "xla_flags": flags,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "python": platform.python_version(),
        **_versions(),
    }


# What must match for two runs to be comparable bit for bit (the hostname alone need not).
HOST_CLASS_KEYS = ("cpu_model", "cpu_isa", "xla_cpu_isa", "xla_cpu_pin", "usable_cpus", "platform", "device_kind",
                   "device_count", "jax", "jaxlib", "flax")


def differences(a: dict | None, b: dict | None) -> list[str]:
    """'key: A vs B' for every host-class key where two host entries differ; ['no host entry']
    when either run predates host recording."""
    if not a or not b:
        return ["no host entry: the run predates host recording"]
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in HOST_CLASS_KEYS if a.get(k) != b.get(k)]
