"""A pod on one machine: N processes × M CPU devices of a real CLI, joined by jax.distributed.

    python -m peer_jax.testing.simulated_pod --processes 2 --devices 2 --logs /tmp/pod -- \\
        peer_jax.train --gin_file=configs/runs/tiny_cpu.gin --workdir=/tmp/pod/run

Each process runs `python -m MODULE ARGS --distributed` with an explicit coordinator on a
free localhost port (or, with ``--launcher slurm``, SLURM-style variables as on a cluster),
``--xla_force_host_platform_device_count=M`` in ``XLA_FLAGS`` (the caller's other XLA flags are
kept), ``JAX_PLATFORMS=cpu`` and gloo collectives. Output goes to one log per process. Waits are
bounded: on a timeout the helper kills its own processes (each runs in its own session) and
nothing else.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def xla_flags(devices: int, flags: str | None = None) -> str:
    """`flags` (default: this process's XLA_FLAGS) with the fake CPU device count set to `devices`."""
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    kept = re.sub(r"--xla_force_host_platform_device_count=\S*", "", flags).split()
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *kept])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class SimulatedPod:
    """`start()`, then `signal(i, sig)`, `wait_for_log(i, pattern)`, `wait()`; `logs(i)` any time."""

    def __init__(self, module: str, args: list[str], *, processes: int = 2, devices: int = 2,
                 log_dir: str | os.PathLike, launcher: str = "explicit", env: dict | None = None,
                 cwd: list[str | os.PathLike] | None = None, host_timeout_s: float | None = None,
                 python: str = sys.executable):
        if launcher not in ("explicit", "slurm"):
            raise ValueError(f"launcher={launcher!r}: use 'explicit' or 'slurm'.")
        self.module, self.args, self.n, self.m = module, list(args), processes, devices
        self.log_dir, self.launcher, self.python = Path(log_dir), launcher, python
        self.extra_env, self.cwd, self.host_timeout_s = dict(env or {}), cwd, host_timeout_s
        self.procs: list[subprocess.Popen] = []
        self.port = None

    def _env(self, i: int) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
        env.update(XLA_FLAGS=xla_flags(self.m, env.get("XLA_FLAGS", "")), JAX_PLATFORMS="cpu",
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", WANDB_MODE=env.get("WANDB_MODE", "disabled"),
                   TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
        if self.launcher == "slurm":
            env.update(SLURM_JOB_ID=str(self.port), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(self.n),
                       SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1",
                       JAX_COORDINATOR_ADDRESS=f"localhost:{self.port}")
        env.update(self.extra_env)
        return env

    def command(self, i: int) -> list[str]:
        cmd = [self.python, "-m", self.module, *self.args, "--distributed"]
        if self.launcher == "explicit":
            cmd += [f"--coordinator_address=localhost:{self.port}", f"--num_processes={self.n}", f"--process_id={i}"]
        if self.host_timeout_s is not None:
            cmd.append(f"--host_timeout_s={self.host_timeout_s}")
        return cmd

    def log_path(self, i: int) -> Path:
        return self.log_dir / f"process{i}.log"

    def start(self) -> SimulatedPod:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        for i in range(self.n):
            with open(self.log_path(i), "w") as log:
                cwd = str(self.cwd[i]) if self.cwd else str(REPO_ROOT)
                self.procs.append(subprocess.Popen(self.command(i), cwd=cwd, env=self._env(i), stdout=log,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True))
        return self

    def logs(self, i: int) -> str:
        p = self.log_path(i)
        return p.read_text(errors="replace") if p.exists() else ""

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- process {i} (rc={p.poll()}) ---\n{self.logs(i)[-chars:]}" for i, p in enumerate(self.procs))

    def signal(self, i: int, sig: int = signal.SIGTERM) -> None:
        if self.procs[i].poll() is None:
            self.procs[i].send_signal(sig)

    def wait_for_log(self, i: int, pattern: str, timeout: float = 300.0) -> re.Match:
        """Waits until process i's log matches `pattern` (a regex); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.logs(i))
            if m:
                return m
            if self.procs[i].poll() is not None:
                m = rx.search(self.logs(i))
                if m:
                    return m
                raise RuntimeError(f"process {i} exited ({self.procs[i].returncode}) before logging "
                                   f"{pattern!r}\n{self.tails()}")
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"process {i} did not log {pattern!r} within {timeout:.0f} s\n{self.tails()}")

    def wait_until(self, condition, what: str, timeout: float = 300.0) -> None:
        """Polls `condition()` while every process runs; kills them all and raises otherwise."""
        deadline = time.monotonic() + timeout
        while not condition():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the simulated pod did not reach: {what}\n{self.tails()}")
            time.sleep(0.01)

    def wait(self, timeout: float = 300.0) -> list[int]:
        """Return codes of all processes; on timeout kills them (only them) and raises TimeoutError."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(f"the simulated pod did not finish within {timeout:.0f} s\n{self.tails()}") from None
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait()

    def __enter__(self) -> SimulatedPod:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(description="Runs a CLI as a simulated pod on this machine.")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    p.add_argument("--logs", required=True, help="directory of the per-process logs")
    p.add_argument("--launcher", default="explicit", choices=("explicit", "slurm"))
    p.add_argument("--timeout", type=float, default=3600.0)
    a = p.parse_args(argv[:split])
    module, *args = argv[split + 1:]
    pod = SimulatedPod(module, args, processes=a.processes, devices=a.devices, log_dir=a.logs, launcher=a.launcher)
    pod.start()
    try:
        codes = pod.wait(a.timeout)
    except KeyboardInterrupt:
        pod.kill()
        return 130
    print(f"exit codes: {codes}; logs in {a.logs}")
    return max(codes, key=abs) if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
