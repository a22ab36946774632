"""A simulated pod: 2 processes × 2 CPU devices of the real CLIs, joined by jax.distributed (gloo).

What a pod relies on, each shown here: the same math as one process with the same devices;
metrics written once; SIGTERM to one host, to both seconds apart, during a checkpoint save
and during an eval — every host stops after the same step, saves once and exits 0, and a
restart ends exactly like an uninterrupted run; a SIGKILLed host is named by the survivor,
which exits 4 within seconds; distributed eval equals a single-process eval; bad pod input
fails at start-up with one line.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from peer_jax.testing.simulated_pod import REPO_ROOT, SimulatedPod, free_port, xla_flags

STEPS = 40  # preemption is agreed within about a second: many fast steps may pass
TIMING_KEYS = ("tokens_per_sec", "step_time_s", "model_flops_per_sec", "mfu", "input_wait_s",
               "checkpoint_blocking_s")


def _args(workdir, *extra):
    return ["--gin_file=configs/runs/tiny_cpu.gin", f"--workdir={workdir}",
            "--gin.transformer.Transformer.num_layers=2", "--gin.transformer.Transformer.d_model=32",
            "--gin.transformer.Transformer.num_heads=2", "--gin.config.TrainConfig.seq_len=64",
            "--gin.config.TrainConfig.batch_size=8", f"--gin.config.TrainConfig.num_steps={STEPS}",
            "--gin.config.TrainConfig.log_every=1", f"--gin.config.TrainConfig.eval_every={STEPS}",
            "--gin.config.TrainConfig.eval_batches=2", "--gin.config.TrainConfig.final_eval_batches=2",
            "--gin.config.TrainConfig.eval_tasks=['kjv']",
            "--gin.config.TrainConfig.checkpoint_every=4", "--gin.config.TrainConfig.progress_bar=False",
            "--gin.config.TrainConfig.vocab_multiple=64", "--gin.optim.make_optimizer.warmup_steps=2",
            "--gin.config.TrainConfig.tensorboard=False", *extra]


# TensorBoard's writer imports TensorFlow (seconds per process): on only where a test reads its files.
TENSORBOARD = "--gin.config.TrainConfig.tensorboard=True"


def _pod(tmp, workdir, *extra, name="pod", **kw):
    return SimulatedPod("peer_jax.train", _args(workdir, *extra), processes=2, devices=2, log_dir=tmp / name, **kw)


def _single(workdir, *extra, devices=4, module="peer_jax.train", args=None):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", module, *(args if args is not None else _args(workdir, *extra))]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rows(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _logged_steps(workdir) -> int:
    f = Path(workdir) / "metrics.jsonl"
    return sum(1 for x in f.read_text().splitlines() if '"loss"' in x) if f.exists() else 0


def _stopped_at(pod) -> list[int]:
    return [int(pod.wait_for_log(i, r"SIGTERM: saved a checkpoint at step (\d+)", timeout=5).group(1))
            for i in range(pod.n)]


def _checkpoints(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _wait_steps(pod, workdir, n):
    pod.wait_until(lambda: _logged_steps(workdir) >= n, f"step {n}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process × 2-device run."""
    tmp = tmp_path_factory.mktemp("reference")
    with _pod(tmp, tmp / "run", TENSORBOARD) as pod:
        codes = pod.wait(600)
        assert codes == [0, 0], pod.tails()
    return tmp / "run"


def test_same_losses_as_one_process_with_four_devices_and_files_written_once(reference, tmp_path):
    p = _single(tmp_path / "run", TENSORBOARD)
    assert p.returncode == 0, p.stderr[-3000:]
    pod_rows, one_rows = _rows(reference), _rows(tmp_path / "run")
    assert [sorted(r) for r in pod_rows] == [sorted(r) for r in one_rows]  # same rows, each once
    for a, b in zip(pod_rows, one_rows):
        for k in a:
            if isinstance(a[k], float):
                # float32 sums over 4 devices in another order (gloo vs in-process all-reduce)
                np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=f"step {a['step']} {k}")
            else:
                assert a[k] == b[k], (a["step"], k)
    assert len(list((reference / "tensorboard").glob("events.out.tfevents.*"))) == 1
    res_pod, res_one = (json.loads((d / "result.json").read_text()) for d in (reference, tmp_path / "run"))
    assert res_pod.keys() == res_one.keys() and res_pod["step"] == res_one["step"] == STEPS
    assert (reference / "operative_config.gin").read_text() == (tmp_path / "run" / "operative_config.gin").read_text()


def test_sigterm_to_one_host_stops_both_at_one_step_and_resume_is_exact(reference, tmp_path):
    run = tmp_path / "run"
    with _pod(tmp_path, run, "--gin.config.TrainConfig.checkpoint_every=100") as pod:
        _wait_steps(pod, run, 3)
        pod.signal(1)  # only the second host hears it
        assert pod.wait(120) == [0, 0], pod.tails()
        stops = _stopped_at(pod)
    assert stops[0] == stops[1] and 3 <= stops[0] < STEPS
    assert _checkpoints(run) == [stops[0]] and _logged_steps(run) == stops[0]
    with _pod(tmp_path, run, name="resumed") as pod:
        assert pod.wait(600) == [0, 0], pod.tails()
    assert _rows(run) == _rows(reference)


def test_sigterm_to_both_hosts_seconds_apart(tmp_path):
    run = tmp_path / "run"
    with _pod(tmp_path, run, f"--gin.config.TrainConfig.num_steps={10 * STEPS}") as pod:
        _wait_steps(pod, run, 2)
        pod.signal(0)
        time.sleep(2.0)
        pod.signal(1)
        assert pod.wait(120) == [0, 0], pod.tails()
        stops = _stopped_at(pod)
    assert stops[0] == stops[1] and _checkpoints(run)[-1] == stops[0] == _logged_steps(run)


def test_sigterm_during_a_checkpoint_save(tmp_path):
    run = tmp_path / "run"
    with _pod(tmp_path, run, f"--gin.config.TrainConfig.num_steps={10 * STEPS}",
              "--gin.config.TrainConfig.checkpoint_every=1") as pod:
        pod.wait_for_log(1, r"saving a checkpoint at step 3")
        pod.signal(1)
        pod.signal(0)
        assert pod.wait(120) == [0, 0], pod.tails()
        stops = _stopped_at(pod)
    assert stops[0] == stops[1] and _checkpoints(run)[-1] == stops[0]
    assert (run / "checkpoints" / str(stops[0]) / "state").is_dir()


def test_sigterm_during_an_eval(tmp_path):
    run = tmp_path / "run"
    with _pod(tmp_path, run, f"--gin.config.TrainConfig.num_steps={10 * STEPS}",
              "--gin.config.TrainConfig.eval_every=3", "--gin.config.TrainConfig.eval_batches=8") as pod:
        pod.wait_for_log(0, r"eval at step 3")
        pod.signal(0)
        assert pod.wait(120) == [0, 0], pod.tails()
        stops = _stopped_at(pod)
    assert stops[0] == stops[1] and _checkpoints(run)[-1] == stops[0]
    assert any("eval_subset/kjv/loss" in r and r["step"] == 3 for r in _rows(run))  # an intermediate eval


def test_a_killed_host_is_named_and_a_restart_resumes_exactly(reference, tmp_path):
    run = tmp_path / "run"
    with _pod(tmp_path, run, host_timeout_s=5) as pod:
        _wait_steps(pod, run, 6)
        # Checkpoints are asynchronous: step 4's may still be in flight at step 6. Kill only
        # once it is committed (a numbered directory), so the restart has it to resume from.
        pod.wait_until(lambda: (run / "checkpoints").is_dir() and any(s >= 4 for s in _checkpoints(run)),
                       "a committed checkpoint at step >= 4")
        pod.signal(1, signal.SIGKILL)
        t0 = time.monotonic()
        codes = pod.wait(120)
        took = time.monotonic() - t0
        log0 = pod.logs(0)
    assert codes == [4, -signal.SIGKILL], pod.tails()
    assert "lost a host: process 1 (" in log0 and "no sign of life" in log0, log0[-2000:]
    assert took < 60
    assert _checkpoints(run) and _checkpoints(run)[-1] >= 4
    with _pod(tmp_path, run, name="restarted") as pod:
        assert pod.wait(600) == [0, 0], pod.tails()
    assert _rows(run) == _rows(reference)


def test_distributed_eval_equals_a_single_process_eval(reference, tmp_path):
    args = ["--gin_file=configs/runs/tiny_cpu.gin", f"--checkpoint_dir={reference / 'checkpoints'}",
            "--tasks=kjv,pydoc", "--max_batches=3", "--batch_size=8",
            *[a for a in _args(reference)[2:] if a.startswith("--gin.")]]
    with SimulatedPod("peer_jax.eval", args, processes=2, devices=2, log_dir=tmp_path / "pod") as pod:
        assert pod.wait(300) == [0, 0], pod.tails()
    pod_result = json.loads((reference / "checkpoints" / f"eval_step{STEPS}.json").read_text())
    p = _single(None, module="peer_jax.eval", args=args)
    assert p.returncode == 0, p.stderr[-3000:]
    one_result = json.loads((reference / "checkpoints" / f"eval_step{STEPS}.json").read_text())
    for task in ("kjv", "pydoc"):
        a, b = pod_result["tasks"][task], one_result["tasks"][task]
        assert a["tokens"] == b["tokens"] > 0
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


# ---- bad pod input: one line at start-up -----------------------------------------------------


def test_a_mesh_that_does_not_fit_the_pod_is_a_clear_error(tmp_path):
    with _pod(tmp_path, tmp_path / "run", "--gin.config.TrainConfig.mesh_shape=(3, 1, 1)") as pod:
        assert pod.wait(120) == [2, 2], pod.tails()
        for i in range(2):
            assert "mesh_shape=(3, 1, 1)" in pod.logs(i) and "2 processes × 2 devices" in pod.logs(i), pod.tails()


def test_an_unreachable_coordinator_is_named(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    p = _single(tmp_path / "run", "--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                "--process_id=1", "--coordinator_timeout_s=3")
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"coordinator at localhost:{port} could not be reached within --coordinator_timeout_s=3" in p.stderr
    assert time.monotonic() - t0 < 60
    assert "Traceback" not in p.stderr


def test_a_workdir_the_hosts_do_not_share_is_detected(tmp_path):
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    for c in cwds:
        c.mkdir()
    with _pod(tmp_path, "run", cwd=cwds) as pod:  # a relative --workdir: a different directory per host
        assert pod.wait(120) == [2, 2], pod.tails()
        for i in range(2):
            assert "--workdir=run is not shared by the hosts" in pod.logs(i), pod.tails()
            assert "process 1 (" in pod.logs(i)


def test_gs_workdir_without_credentials_fails_fast(tmp_path):
    env_home = tmp_path / "home"
    env_home.mkdir()
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "peer_jax.train", *_args("gs://peer-jax-test-bucket/run")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env={**{k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"},
                            "HOME": str(env_home), "NO_GCE_CHECK": "True", "JAX_PLATFORMS": "cpu",
                            "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)})
    assert p.returncode == 2, p.stderr[-3000:]
    assert "gs://peer-jax-test-bucket/run: no Google Cloud credentials found" in p.stderr
    assert "compile" not in p.stderr and time.monotonic() - t0 < 120
