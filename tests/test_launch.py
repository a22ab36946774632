"""launch/ on a simulated 2-worker slice (launch/sim/gcloud first on PATH).

setup.sh copies the checkout to both workers; train.sh runs the trainer on both (SLURM-style
variables join them, and --env reaches both trainers' environments); stop.sh --worker=1 signals
one worker only, and both stop at the same step with one checkpoint; train.sh again resumes to
the end.
"""

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer_jax.testing.simulated_pod import xla_flags

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


def _env(sim_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS"))}
    return {**env, "PATH": f"{ROOT / 'launch' / 'sim'}:{env['PATH']}", "SIM_ROOT": str(sim_root), "SIM_WORKERS": "2",
            "SIM_JOB_ID": str(random.randrange(1000, 4000)), "WANDB_MODE": "disabled",
            "XLA_FLAGS": xla_flags(2), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


def _script(name, *args, env, timeout=600, check=True):
    p = subprocess.run(["bash", str(ROOT / "launch" / name), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, f"{name}: {p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def slice_(tmp_path_factory):
    sim = tmp_path_factory.mktemp("sim")
    env = _env(sim)
    _script("setup.sh", "--skip_install", env=env)
    for i in range(2):
        (sim / f"worker{i}" / "peer_jax" / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return sim, env


def _train_args(workdir):
    return ["--", "--gin_file=configs/runs/tiny_cpu.gin", f"--workdir={workdir}",
            "--gin.transformer.Transformer.num_layers=2", "--gin.transformer.Transformer.d_model=32",
            "--gin.transformer.Transformer.num_heads=2", "--gin.config.TrainConfig.seq_len=64",
            "--gin.config.TrainConfig.batch_size=8", f"--gin.config.TrainConfig.num_steps={STEPS}",
            "--gin.config.TrainConfig.log_every=1", "--gin.config.TrainConfig.eval_every=0",
            "--gin.config.TrainConfig.checkpoint_every=100", "--gin.config.TrainConfig.progress_bar=False",
            "--gin.config.TrainConfig.vocab_multiple=64", "--gin.config.TrainConfig.tensorboard=False"]


def test_stop_one_worker_then_resume_on_a_simulated_slice(slice_):
    sim, env = slice_
    workdir = sim / "shared" / "run1"
    mark = "--xla_flag=a b 'c'"  # spaces, quotes and '=' survive the trip
    train = subprocess.Popen(["bash", str(ROOT / "launch" / "train.sh"), "--run=run1", f"--env=PEER_JAX_MARK={mark}",
                              *_train_args(workdir)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert train.poll() is None and time.monotonic() < deadline, train.communicate()[0][-3000:]
        time.sleep(0.05)
    for i in range(2):
        pid = (sim / f"worker{i}" / "peer_jax_logs" / "run1.pid").read_text().strip()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"PEER_JAX_MARK={mark}".encode() in environ, (i, [e for e in environ if b"PEER_JAX" in e])
    stop = _script("stop.sh", "--run=run1", "--worker=1", "--wait=120", env=env)
    out, _ = train.communicate(timeout=120)
    assert train.returncode == 0, out[-3000:]
    steps = re.findall(r"saved a checkpoint at step (\d+) and stopped", stop.stdout)
    assert len(steps) == 2 and steps[0] == steps[1], stop.stdout
    stopped = int(steps[0])
    assert 3 <= stopped < STEPS
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [stopped]
    _script("train.sh", "--run=run1", *_train_args(workdir), env=env)
    assert json.loads((workdir / "result.json").read_text())["step"] == STEPS
    for i in range(2):
        log = (sim / f"worker{i}" / "peer_jax_logs" / "run1.worker{}.log".format(i)).read_text()
        assert f"resumed from step {stopped}" in log
