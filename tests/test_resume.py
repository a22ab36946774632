"""Survival: SIGKILL at random moments (also mid-checkpoint) and resume ends bitwise identical;
SIGTERM saves and exits 0; a non-finite loss stops clearly; a corrupt or mismatched checkpoint is an
error whose one line is the last thing printed."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
TIMING_KEYS = ("tokens_per_sec", "step_time_s", "model_flops_per_sec", "mfu", "input_wait_s",
               "checkpoint_blocking_s")  # wall-clock derived


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "peer_jax.train", "--gin_file=configs/runs/tiny_cpu.gin", f"--workdir={workdir}",
            "--gin.transformer.Transformer.num_layers=2", "--gin.transformer.Transformer.d_model=32",
            "--gin.transformer.Transformer.num_heads=2", "--gin.config.TrainConfig.seq_len=64",
            "--gin.config.TrainConfig.batch_size=8", f"--gin.config.TrainConfig.num_steps={STEPS}",
            "--gin.config.TrainConfig.log_every=1", f"--gin.config.TrainConfig.eval_every={STEPS}",
            "--gin.config.TrainConfig.eval_batches=1", "--gin.config.TrainConfig.final_eval_batches=1",
            "--gin.config.TrainConfig.eval_tasks=['kjv']",
            "--gin.config.TrainConfig.checkpoint_every=2", "--gin.config.TrainConfig.progress_bar=False",
            "--gin.config.TrainConfig.tensorboard=False", "--gin.config.TrainConfig.vocab_multiple=64",
            "--gin.optim.make_optimizer.warmup_steps=2", *extra]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def _run(workdir, *extra, check=True):
    p = subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _run_merged(workdir, *extra) -> tuple[int, str]:
    """(exit status, stdout and stderr interleaved as on a terminal) of a run expected to fail."""
    p = subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=600)
    return p.returncode, p.stdout


def _last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


def _logged_steps(workdir) -> int:
    f = Path(workdir) / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _metrics(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _final_params(workdir):
    import orbax.checkpoint as ocp

    import jax

    path = str(Path(workdir) / "checkpoints" / str(STEPS) / "state")
    ckpt = ocp.PyTreeCheckpointer()
    meta = ckpt.metadata(path)
    # As host numpy arrays: restoring jax.Arrays without shardings makes orbax warn and guess them.
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta.item_metadata.tree)
    return ckpt.restore(path, restore_args=as_numpy)["params"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir)
    return workdir


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(reference, tmp_path):
    rng = random.Random(1234)
    workdir = tmp_path / "killed"
    kills = 0
    for target in sorted(rng.sample(range(2, STEPS - 1), 3)):
        proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while _logged_steps(workdir) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # land anywhere: mid-step or mid-checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    _run(workdir)
    assert kills == 3
    assert _metrics(workdir) == _metrics(reference)
    want, got = _final_params(reference), _final_params(workdir)
    import jax

    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_sigterm_checkpoints_current_step_and_exits_zero(tmp_path):
    workdir = tmp_path / "term"
    proc = subprocess.Popen(_cmd(workdir, "--gin.config.TrainConfig.checkpoint_every=1000"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while _logged_steps(workdir) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < STEPS
    assert _logged_steps(workdir) == saved[0]


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path):
    p = _run(tmp_path / "nan", "--gin.optim.make_optimizer.peak_lr=1e30", "--gin.optim.make_optimizer.grad_clip_norm=None",
             check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "non-finite loss or gradient at step" in p.stderr


def test_corrupt_checkpoint_is_a_clear_error_never_a_fresh_start(reference, tmp_path):
    import shutil

    workdir = tmp_path / "corrupt"
    shutil.copytree(reference, workdir)
    for f in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    status, out = _run_merged(workdir)
    # one line, the last one printed, that names the newest intact checkpoint and how to resume from it
    intact = STEPS - 2
    assert status == 2 and _last_line(out).startswith(f"error: checkpoint {workdir}/checkpoints/{STEPS} is unreadable")
    assert _last_line(out).endswith(f"The newest intact checkpoint is step {intact}: resume from it with "
                                    f"--restore_step={intact} (nothing is deleted; newer checkpoints are set aside), "
                                    "or use a new --workdir."), out[-2000:]
    assert "Traceback" not in out and "Event loop is closed" not in out
    # ... which works, and sets the corrupt one aside instead of deleting it
    _run(workdir, f"--restore_step={intact}")
    assert (workdir / "checkpoints" / f"{STEPS}.set_aside").is_dir()
    assert _metrics(workdir) == _metrics(reference)


def test_resuming_with_another_model_size_is_one_clear_line(reference, tmp_path):
    import shutil

    workdir = tmp_path / "other_size"
    shutil.copytree(reference, workdir)
    status, out = _run_merged(workdir, "--gin.transformer.Transformer.d_model=48")
    last = _last_line(out)
    assert status == 2 and last.startswith(f"error: checkpoint {workdir}/checkpoints/{STEPS} does not fit this model"), \
        out[-2000:]
    assert "checkpoint (2, 16, 32) float32 vs this run (2, 24, 48) float32" in last
    assert "Traceback" not in out and "Event loop is closed" not in out


@pytest.mark.parametrize("garbled", [("state/d", "state/ocdbt.process_0/d"), ("state/ocdbt.process_0/d",)],
                         ids=["all_array_files", "array_chunks"])
def test_corrupt_array_files_end_with_the_error_line(reference, tmp_path, garbled):
    """Array files garbled, metadata intact: orbax's reads fail inside TensorStore, whose threads
    print tracebacks and whose error carries a multi-line spec. None of it reaches the user:
    the project's line is the last one printed, and it is one clean line."""
    import shutil

    workdir = tmp_path / "garbled"
    shutil.copytree(reference, workdir)
    for folder in garbled:
        for f in (workdir / "checkpoints" / str(STEPS) / folder).rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")
    status, out = _run_merged(workdir)
    last = _last_line(out)
    assert status == 2 and last.startswith(f"error: checkpoint {workdir}/checkpoints/{STEPS} is unreadable"), out[-2000:]
    assert last.endswith(f"resume from it with --restore_step={STEPS - 2} (nothing is deleted; newer checkpoints are "
                         "set aside), or use a new --workdir.")
    assert "TensorStore" not in out and "Traceback" not in out and "Event loop is closed" not in out
