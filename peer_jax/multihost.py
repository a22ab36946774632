"""Multi-host (pod) plumbing: joining the pod, hosts that agree, a lost host named, a shared workdir.

Every host of a Cloud TPU pod runs the same `python -m peer_jax.train --distributed ...`.
What one host could decide alone is either agreed or derived from global state, so that no
collective waits forever (DESIGN.md, "Hosts agree"):

* **Joining.** `initialize` calls `jax.distributed.initialize` (explicit coordinator flags, or
  detection: TPU VM metadata, SLURM variables, ``$JAX_COORDINATOR_ADDRESS``) and turns a
  coordinator that cannot be reached into one line naming the address.
* **A lost host.** Each host runs a small watchdog thread that bumps a counter in the
  coordination service's key-value store every second (every n/64 s on n > 64 hosts) and reads
  everyone else's. A host whose
  counter has not moved for ``--host_timeout_s`` (killed, crashed, unreachable), or that
  announced a failure, makes every other host print one line naming it (process index, host
  name, pid) and exit with status 4. JAX's own heartbeat (set 30 s longer) stays as the
  backstop: it aborts the process when the coordinator itself (process 0) is gone.
* **Preemption** is agreed by JAX's preemption sync manager; see `peer_jax/training/preemption.py`.
* **A shared workdir.** Process 0 writes a marker that every other process must see.
* **gs:// without credentials** fails at start-up, not at the first checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
import uuid

from peer_jax import cli

log = logging.getLogger("peer_jax")

EXIT_HOST_LOST = 4
_KV = "peer_jax"


class PodError(RuntimeError):
    """A multi-host set-up problem, reported as one line (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-host (pods): every host runs the same command")
    g.add_argument("--distributed", action="store_true",
                   help="join the other hosts with jax.distributed.initialize() first (pods, SLURM)")
    g.add_argument("--coordinator_address", default=None,
                   help="HOST:PORT of process 0 (default: detected on TPU VMs and SLURM, or "
                        "$JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num_processes", type=int, default=None, help="number of processes (default: detected)")
    g.add_argument("--process_id", type=int, default=None, help="this process's index (default: detected)")
    g.add_argument("--coordinator_timeout_s", type=int, default=300,
                   help="how long to wait for the coordinator and the other hosts at start-up")
    g.add_argument("--host_timeout_s", type=float, default=30.0,
                   help="a host silent this long is declared lost; the others exit with status 4")


class _Pod:
    """Process-wide state of a multi-host run (None of it exists in a single-process run)."""

    def __init__(self, client, process_id: int, num_processes: int, coordinator: str, host_timeout_s: float):
        self.client, self.me, self.n = client, process_id, num_processes
        self.coordinator, self.host_timeout_s = coordinator, host_timeout_s
        self.hosts: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self, i: int) -> str:
        return f"process {i} ({self.hosts.get(i, 'unknown host')})"

    def register(self, timeout_s: float) -> None:
        """Publishes this host's name and pid; reads everyone's (a barrier: all hosts are up)."""
        self.client.key_value_set(f"{_KV}/host/{self.me}", f"{socket.gethostname()}, pid {os.getpid()}")
        self.client.wait_at_barrier(f"{_KV}/registered", int(timeout_s * 1000))
        for key, value in self.client.key_value_dir_get(f"{_KV}/host/"):
            self.hosts[int(key.rsplit("/", 1)[-1])] = value

    def start_watchdog(self, interval_s: float = 1.0) -> None:
        self._thread = threading.Thread(target=self._watch, args=(interval_s,), name="peer_jax-watchdog", daemon=True)
        self._thread.start()

    def stop_watchdog(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self, interval_s: float) -> None:
        beat = 0
        seen: dict[int, tuple[str | None, float]] = {i: (None, time.monotonic()) for i in range(self.n)}
        unreachable_since = None
        while not self._stop.wait(interval_s):
            beat += 1
            try:
                self.client.key_value_set(f"{_KV}/alive/{self.me}", str(beat), allow_overwrite=True)
                entries = self.client.key_value_dir_get(f"{_KV}/")  # one read: alive, failed, done
                unreachable_since = None
            except Exception as e:  # noqa: BLE001 - the coordination service itself is gone
                if self._stop.is_set():
                    return
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.host_timeout_s:
                    self._die(f"lost the coordinator {self.describe(0)} at {self.coordinator}: "
                              f"{cli.first_line(e)}")
                continue
            alive, failed, done = _by_process(entries, "alive"), _by_process(entries, "failed"), _by_process(entries, "done")
            failed.pop(self.me, None)
            if failed:
                i, why = sorted(failed.items())[0]
                self._die(f"{self.describe(i)} failed: {why}")
            now = time.monotonic()
            for i in range(self.n):
                if alive.get(i) != seen[i][0]:
                    seen[i] = (alive.get(i), now)
            lost = [i for i in range(self.n)
                    if i != self.me and i not in done and now - seen[i][1] > self.host_timeout_s]
            if lost and not self._stop.is_set():
                self._die(", ".join(self.describe(i) for i in lost)
                          + f": no sign of life for {self.host_timeout_s:.0f} s (killed, crashed or unreachable)")

    def _die(self, why: str) -> None:
        if self._stop.is_set():  # this host is already exiting with its own error
            return
        ckpt = sys.modules.get("peer_jax.training.checkpoint")
        if ckpt is not None:  # stderr may be held by a checkpoint read; os._exit would lose this line
            ckpt.release_stderr()
        print(f"error: lost a host: {why}. This is {self.describe(self.me)}; exiting with status "
              f"{EXIT_HOST_LOST}. The last complete checkpoint is intact: restart every host to resume.",
              file=sys.stderr, flush=True)
        if self.me == 0:  # the coordinator: give the others a moment to exit on their own terms
            time.sleep(3.0)
        os._exit(EXIT_HOST_LOST)

    def announce_done(self) -> None:
        """This host finished normally: its silence from now on is not a loss."""
        try:
            self.client.key_value_set(f"{_KV}/done/{self.me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def announce_failure(self, message: str) -> None:
        """Tells the other hosts (through their watchdogs) that this one is exiting with an error."""
        try:
            why = message.strip().splitlines()[0][:500].rstrip(".") if message.strip() else "failed"
            self.client.key_value_set(f"{_KV}/failed/{self.me}", why, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - best effort: the watchdogs also notice the silence
            pass


_POD: _Pod | None = None


def _by_process(entries, kind: str) -> dict[int, str]:
    """{process: value} of the `peer_jax/<kind>/<process>` keys among `entries`."""
    out = {}
    for key, value in entries:
        parts = key.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == kind and parts[-1].isdigit():
            out[int(parts[-1])] = value
    return out


def initialize(args: argparse.Namespace) -> None:
    """Joins the pod when `--distributed` is given (a no-op otherwise). Raises PodError."""
    global _POD
    if not getattr(args, "distributed", False):
        return
    import jax
    from jax._src import distributed as jax_distributed

    address, num_processes, process_id, local_devices = _resolve(args)
    if process_id:  # not the coordinator: it must be reachable, or JAX aborts without naming it
        _wait_for_coordinator(address, args.coordinator_timeout_s)
    try:
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id,
            local_device_ids=local_devices, initialization_timeout=args.coordinator_timeout_s,
            heartbeat_timeout_seconds=int(args.host_timeout_s) + 30)
    except Exception as e:  # noqa: BLE001 - jax raises several types here
        raise PodError(
            f"could not join the pod through the coordinator at {address} ({cli.first_line(e)}). Check that "
            "--num_processes/--process_id match the other hosts and that all of them start within "
            f"--coordinator_timeout_s={args.coordinator_timeout_s}.") from e
    state = jax_distributed.global_state
    if state.preemption_sync_manager is None:
        raise PodError("JAX's preemption service is off (jax_enable_preemption_service=False); multi-host "
                       "peer_jax runs need it so that every host stops at the same step. Turn it back on.")
    _POD = _Pod(state.client, jax.process_index(), jax.process_count(), state.coordinator_address,
                args.host_timeout_s)
    _POD.register(args.coordinator_timeout_s)
    _POD.start_watchdog(interval_s=max(1.0, _POD.n / 64))  # the coordinator serves every host each tick
    log.info("pod: %s; coordinator %s", ", ".join(_POD.describe(i) for i in range(_POD.n)), _POD.coordinator)


def _resolve(args: argparse.Namespace):
    """(coordinator address, process count, process id, local device ids): the flags, else
    $JAX_COORDINATOR_ADDRESS, else what JAX detects (TPU VM metadata, SLURM, ...)."""
    from jax._src import clusters

    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    found = (address, args.num_processes, args.process_id, None)
    if None in found[:3]:
        found = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            address, args.num_processes, args.process_id, None, None, args.coordinator_timeout_s)
    if None in found[:3]:
        raise PodError(
            "--distributed: could not determine the pod (coordinator address, process count, process id) "
            f"= {found[:3]}: not on a TPU VM slice or a SLURM allocation. Pass --coordinator_address=HOST:PORT "
            "--num_processes=N --process_id=I.")
    return found


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise PodError(
                    f"the coordinator at {address} could not be reached within --coordinator_timeout_s={timeout_s:g} "
                    f"({e}). Check that process 0 runs and that this address (--coordinator_address=HOST:PORT or "
                    "$JAX_COORDINATOR_ADDRESS) reaches it from this host; or raise --coordinator_timeout_s.") from e
            time.sleep(0.5)


def finish(status: int, message: str | None = None, *, grace_s: float = 0.0) -> int:
    """Ends this host's part in the pod; returns `status` (single process: just returns it).

    On failure the other hosts are told (their watchdogs exit naming this host) and this one
    exits at once, skipping JAX's shutdown barrier: the others may be blocked in a collective
    and never reach it. `grace_s` first gives the watchdog time to name a lost host, for errors
    that are likely a consequence of one (a failed collective).
    """
    if not getattr(jax_distributed().global_state, "client", None):
        return status
    if status != 0:
        if _POD is not None:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                time.sleep(0.2)  # the watchdog exits the process if a host is lost
            _POD.stop_watchdog()  # from here on this host's own error is the one it reports
            _POD.announce_failure(message or f"exited with status {status}")
            time.sleep(2.5)  # the others' watchdogs read it (the coordinator must still be up)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if _POD is not None:
        _POD.announce_done()
        _POD.stop_watchdog()
    return status


def fail(error: BaseException | str, status: int = 2, *, grace_s: float = 0.0) -> int:
    """`error: <message>` on stderr, then `finish` (the CLIs' one failure path)."""
    return finish(cli.fail(error, status), str(error), grace_s=grace_s)


def jax_distributed():
    from jax._src import distributed

    return distributed


# ---------------------------------------------------------------------------------------------
# Agreement and checks that every host runs at the same point.


def any_host(flag: bool) -> bool:
    """True on every host if `flag` is true on any host (a collective: call it on all hosts)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Every host waits here until all have arrived (the coordination service's barrier, not a
    collective); a no-op outside a pod. Why: gloo builds its context at the first collective and
    waits only 30 s for the other hosts, so hosts that finish their set-up (compiles, data) more
    than 30 s apart fail there; after this barrier they reach it together. A host that dies
    meanwhile is caught by the watchdog long before `timeout_s`."""
    if _POD is None:
        return
    _POD.client.wait_at_barrier(f"{_KV}/{name}", int(max(timeout_s, _POD.host_timeout_s) * 1000))


def check_workdir(workdir: str) -> None:
    """Fails fast on a gs:// workdir without credentials and on a workdir the hosts don't share."""
    if workdir.startswith("gs://"):
        check_cloud_credentials(workdir)
    if _POD is None:
        return
    from etils import epath

    pod, client = _POD, _POD.client
    timeout_ms = int(pod.host_timeout_s * 1000)
    if pod.me == 0:
        name = f".peer_jax_host_check_{uuid.uuid4().hex[:12]}"
        marker = epath.Path(workdir) / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(pod.describe(0))
        client.key_value_set(f"{_KV}/workdir_marker", name)
    else:
        name = client.blocking_key_value_get(f"{_KV}/workdir_marker", timeout_ms)
        marker = epath.Path(workdir) / name
    client.key_value_set(f"{_KV}/workdir_seen/{pod.me}", "1" if marker.exists() else "0")
    client.wait_at_barrier(f"{_KV}/workdir_checked", timeout_ms)
    seen = {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(f"{_KV}/workdir_seen/")}
    if pod.me == 0:
        marker.unlink(missing_ok=True)
    blind = [i for i in range(pod.n) if seen.get(i) != "1"]
    if blind:
        raise PodError(
            f"--workdir={workdir} is not shared by the hosts: {pod.describe(0)} wrote {name} there, and "
            f"{', '.join(pod.describe(i) for i in blind)} cannot see it. Every host must read and write the same "
            "run directory: use gs://BUCKET/DIR on a Cloud TPU slice (or a filesystem mounted on every host).")


def check_cloud_credentials(path: str) -> None:
    """gs:// needs Google Cloud credentials; find them now rather than at the first checkpoint."""
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError as e:  # pragma: no cover - google-auth is a dependency
        raise PodError(f"{path}: gs:// paths need the google-auth package ({e}).") from e
    try:
        google.auth.default()
    except DefaultCredentialsError as e:
        raise PodError(
            f"{path}: no Google Cloud credentials found ({cli.first_line(e)}). On a TPU VM the VM's service "
            "account is used; elsewhere run `gcloud auth application-default login` or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file. Or use a local --workdir.") from e


def process_row_block(sharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """(index, count) of this process's block of batch rows among the distinct blocks.

    `sharding` places a global batch array of `shape` ([batch, length]). Processes whose
    devices hold the same rows (a 'model' axis that spans hosts) get the same index, so they
    read the same data; `count` equal blocks, in process order, tile the global batch.
    """
    import jax

    def span(indices) -> tuple[int, int]:
        rows = [range(shape[0])[idx[0]] for idx in indices]
        return min(r.start for r in rows), max(r.stop for r in rows)

    by_process: dict[int, list] = {}
    for device, idx in sharding.devices_indices_map(shape).items():
        by_process.setdefault(device.process_index, []).append(idx)
    spans = sorted({span(v) for v in by_process.values()})
    size = spans[0][1] - spans[0][0]
    if any(a != k * size or b != a + size for k, (a, b) in enumerate(spans)) or spans[-1][1] != shape[0]:
        raise ValueError(
            f"the batch sharding gives the {jax.process_count()} processes overlapping or unequal blocks of rows "
            f"{spans}; choose TrainConfig.mesh_shape so that each host holds whole data-parallel shards.")
    return spans.index(span(by_process[jax.process_index()])), len(spans)
