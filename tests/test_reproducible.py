"""Bit-for-bit reruns under the XLA:CPU pin (TrainConfig.xla_cpu_pin / xla_cpu_threads).

A tiny dense run, pinned to AVX2 and one intra-op thread, trained in fresh processes:

* twice on this host: the same losses, gradient norms, parameter norms and eval loss, bit for bit;
* once more limited to one core (`taskset`), the stand-in for a host with another core count;
* against tests/data/pinned_tiny_dense.json, the same run's numbers as committed: a rerun in a
  fresh clone on a host with the same CPU model and jax/jaxlib reproduces them (on another CPU
  model the matmul libraries' cache-sized blocking may move a last bit; docs/reproducibility.md).
  Regenerate (after a deliberate change of the model's numerics) with
  `python tests/test_reproducible.py`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests/data/pinned_tiny_dense.json"
STEPS = 6
ARGS = ["--gin_file=configs/runs/tiny_cpu.gin", "--gin.transformer.Transformer.num_layers=2",
        "--gin.transformer.Transformer.d_model=32", "--gin.transformer.Transformer.num_heads=2",
        "--gin.config.TrainConfig.seq_len=64", "--gin.config.TrainConfig.batch_size=8",
        f"--gin.config.TrainConfig.num_steps={STEPS}", "--gin.config.TrainConfig.log_every=1",
        f"--gin.config.TrainConfig.eval_every={STEPS}", "--gin.config.TrainConfig.eval_batches=1",
        "--gin.config.TrainConfig.final_eval_batches=1",
        "--gin.config.TrainConfig.eval_tasks=['kjv']", f"--gin.config.TrainConfig.checkpoint_every={STEPS}",
        "--gin.config.TrainConfig.progress_bar=False", "--gin.config.TrainConfig.tensorboard=False",
        "--gin.config.TrainConfig.vocab_multiple=64", "--gin.optim.make_optimizer.warmup_steps=2",
        "--gin.config.TrainConfig.xla_cpu_pin='AVX2'", "--gin.config.TrainConfig.xla_cpu_threads=1"]


def train(workdir: Path, taskset: str | None = None) -> dict:
    """The run's numbers (every logged step) and its host entry."""
    cmd = [sys.executable, "-m", "peer_jax.train", *ARGS, f"--workdir={workdir}"]
    if taskset is not None:
        cmd = ["taskset", "-c", taskset, *cmd]
    env = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    numbers = {k: [r[k] for r in rows if k in r] for k in ("loss", "grad_norm", "param_norm", "eval_loss")}
    return {"numbers": numbers, "host": json.loads((workdir / "result.json").read_text())["host"]}


def _has_avx2() -> bool:
    from peer_jax import host

    best = host.best_isa()
    return best is not None and list(host.ISA_LEVELS).index(best) >= list(host.ISA_LEVELS).index("AVX2")


pytestmark = pytest.mark.skipif(not _has_avx2() or shutil.which("taskset") is None,
                                reason="needs an x86-64 CPU with AVX2 and taskset")


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return train(tmp_path_factory.mktemp("pinned") / "run")


def test_pinned_run_records_its_pin(first):
    h = first["host"]
    assert h["xla_cpu_pin"] == "AVX2" and h["xla_cpu_isa"] == "AVX2" and h["usable_cpus"] == 1
    assert "--xla_cpu_experimental_ynn_fusion_type=" in h["xla_flags"].split()
    assert len(first["numbers"]["loss"]) == STEPS and len(first["numbers"]["eval_loss"]) == 1


def test_pinned_reruns_are_bit_identical_also_on_one_core(first, tmp_path):
    assert train(tmp_path / "again")["numbers"] == first["numbers"]
    assert train(tmp_path / "one_core", taskset="0")["numbers"] == first["numbers"]


def test_pinned_run_reproduces_the_committed_numbers(first):
    golden = json.loads(GOLDEN.read_text())
    for key in ("jax", "jaxlib", "cpu_model"):
        if golden["host"][key] != first["host"][key]:
            pytest.skip(f"{key} {first['host'][key]!r} here, {golden['host'][key]!r} for the committed numbers: "
                        "bits need not match (docs/reproducibility.md)")
    assert first["numbers"] == golden["numbers"], (
        f"committed on {golden['host']['cpu_model']}, rerun on {first['host']['cpu_model']}; if the model's "
        "numerics changed on purpose, regenerate with `python tests/test_reproducible.py`")


if __name__ == "__main__":  # regenerate the committed numbers
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run = train(Path(tmp) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"command": "python tests/test_reproducible.py", "args": ARGS, **run}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
