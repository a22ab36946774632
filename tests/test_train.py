"""End-to-end training on the embedded corpus: loss falls, resume is exact, errors are clear."""

import dataclasses
import functools
import json
import shutil

import pytest

from peer_jax import train as train_cli
from peer_jax.models.transformer import Transformer
from peer_jax.training import loop, optim
from peer_jax.training.config import TrainConfig

STEPS = 24


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        model=functools.partial(Transformer, num_layers=2, d_model=64, num_heads=2),
        optimizer=functools.partial(optim.make_optimizer, peak_lr=3e-3, warmup_steps=4),
        eval_tasks=("kjv",), seq_len=64, batch_size=16, num_steps=STEPS, log_every=1, eval_every=STEPS,
        eval_batches=2, final_eval_batches=2, checkpoint_every=12, progress_bar=False, tensorboard=False,
        vocab_multiple=64,
    )
    return TrainConfig(**{**base, **kw})


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    result = loop.train(tiny_config(), str(workdir))
    return workdir, result


def test_loss_falls_and_metrics_are_written(full_run):
    workdir, result = full_run
    train_rows = [r for r in rows(workdir) if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert all(r["tokens_per_sec"] > 0 for r in train_rows)
    first, last = train_rows[0]["loss"], sum(r["loss"] for r in train_rows[-4:]) / 4
    assert last < first - 1.0, (first, last)  # bytes start near log(vocab) ≈ 4.2 nats
    eval_rows = [r for r in rows(workdir) if "eval_loss" in r]
    assert eval_rows and eval_rows[-1]["eval_ppl"] == pytest.approx(2.718281828 ** eval_rows[-1]["eval_loss"])
    assert result["step"] == STEPS and (workdir / "compile_report.json").exists()


def test_resume_from_checkpoint_is_exact(full_run, tmp_path):
    """Restart from the step-12 checkpoint: steps 13..24 reproduce the uninterrupted run bitwise."""
    workdir, _ = full_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    loop.train(tiny_config(), str(resumed))
    keys = ("loss", "ce_loss", "grad_norm", "param_norm", "eval_loss")
    strip = lambda rs: [{k: r[k] for k in ("step",) + keys if k in r} for r in rs]  # noqa: E731
    assert strip(rows(resumed)) == strip(rows(workdir))


def test_resume_is_exact_for_peer_with_optimizer_groups_and_intermediate_evals(tmp_path):
    """The mini3 recipe (PEER with query BN, the sub-keys in their own optimizer group at 0.1 × LR,
    validation-curve evals between checkpoints): a run restarted from its step-8 checkpoint logs
    the same train and eval rows, bit for bit, as the uninterrupted one."""
    from peer_jax.layers.peer import PEER

    cfg = tiny_config(
        model=functools.partial(Transformer, num_layers=2, d_model=32, num_heads=2, sparse_blocks="middle",
                                sparse_ffw=functools.partial(PEER, num_experts=16**2, heads=2, top_k=4, d_key=16,
                                                             query_batchnorm=True)),
        optimizer=functools.partial(optim.make_optimizer, peak_lr=1e-2, warmup_steps=3,
                                    param_groups={"keys": {"lr_scale": 0.1}}),
        seq_len=32, batch_size=8, num_steps=16, eval_every=4, eval_batches=1, final_eval_batches=2,
        checkpoint_every=8)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    loop.train(cfg, str(full))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "16")
    # keep only what the step-8 checkpoint had logged, so every later row must come from the resumed run
    (resumed / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 8))
    loop.train(cfg, str(resumed))
    timing = ("tokens_per_sec", "step_time_s", "model_flops_per_sec", "mfu", "input_wait_s", "checkpoint_blocking_s",
              "eval_time_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing and not k.endswith("_time_s")}  # noqa: E731
                        for r in rs]
    a, b = strip(rows(full)), strip(rows(resumed))
    assert any(k.startswith("eval_subset/kjv/") for r in a if r["step"] > 8 for k in r)
    assert any("usage" in k for r in a if r["step"] > 8 for k in r) and a[-1]["step"] == 16
    assert b == a


def test_incompatible_checkpoint_is_a_clear_error(full_run, tmp_path):
    workdir, _ = full_run
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    with pytest.raises(Exception, match="seq_len"):
        loop.train(dataclasses.replace(tiny_config(), seq_len=32), str(other))


@pytest.mark.parametrize("args, message", [
    (["--gin.config.TrainConfig.no_such_setting=1"], "no_such_setting"),
    (["--gin.config.TrainConfig.mesh_shape=(3, 1, 1)"], "mesh_shape"),
    (["--gin.config.TrainConfig.batch_size=6"], "batch_size"),
    # unparsable values: the binding and its value are named
    (["--gin.config.TrainConfig.num_steps=(1,"], "--gin.config.TrainConfig.num_steps=(1,: the value is not a gin"),
    (["--gin.config.TrainConfig.train_task=kjv"], "--gin.config.TrainConfig.train_task=kjv: the value is not a gin"),
])
def test_cli_config_errors_name_the_setting(args, message, tmp_path, capsys):
    code = train_cli.main(["--gin_file=configs/runs/tiny_cpu.gin", f"--workdir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_cli_missing_gin_file(tmp_path, capsys):
    code = train_cli.main(["--gin_file=configs/nope.gin", f"--workdir={tmp_path}"])
    assert code == 2 and "configs/nope.gin" in capsys.readouterr().err


def test_tensorboard_scalars_are_written_through_clu(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorflow import make_ndarray

    from peer_jax.training.metrics import MetricsWriter

    w = MetricsWriter(str(tmp_path), tensorboard=True)
    w.write(3, {"loss": 2.5, "eval/kjv/ppl": 9.0, "note": "not a scalar"})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["tensors"]) == ["eval/kjv/ppl", "loss"]
    (event,) = acc.Tensors("loss")
    assert event.step == 3 and float(make_ndarray(event.tensor_proto)) == 2.5
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["note"] == "not a scalar"


def test_compilation_cache_dir_serves_a_second_run_without_new_compiles(tmp_path):
    """TrainConfig.compilation_cache_dir: the first run stores its compiled programs; an identical
    second run (another workdir, a fresh process) finds every one of them, so it adds none."""
    import os
    import subprocess
    import sys

    from peer_jax.testing.simulated_pod import xla_flags

    cache = tmp_path / "cache"

    def run(name):
        cmd = [sys.executable, "-m", "peer_jax.train", "--gin_file=configs/runs/tiny_cpu.gin",
               f"--workdir={tmp_path / name}", "--gin.config.TrainConfig.num_steps=2",
               "--gin.config.TrainConfig.eval_every=2", "--gin.config.TrainConfig.eval_batches=1",
               "--gin.config.TrainConfig.final_eval_batches=1",
               "--gin.config.TrainConfig.checkpoint_every=2", "--gin.config.TrainConfig.tensorboard=False",
               "--gin.transformer.Transformer.num_layers=1", "--gin.transformer.Transformer.d_model=32",
               "--gin.transformer.Transformer.num_heads=1", "--gin.config.TrainConfig.seq_len=32",
               "--gin.config.TrainConfig.batch_size=8", f"--gin.config.TrainConfig.compilation_cache_dir='{cache}'"]
        env = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": xla_flags(1)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "compile_report.json").read_text())

    run("first")
    stored = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_step") or "step" in name for name in stored), stored
    second = run("second")
    assert sorted(p.name for p in cache.iterdir()) == stored  # every program was a cache hit
    assert second["compile_s"] > 0


@pytest.mark.parametrize("binding, message", [
    ("--gin.config.TrainConfig.mesh_shape=(3, 1, 1)", "error: mesh_shape=(3, 1, 1) (axes ('data', 'expert', "
     "'model')) needs 3 devices but 1 are available"),
    ("--gin.config.TrainConfig.eval_tasks=['no_such_task']", "error: TrainConfig.eval_tasks: task 'no_such_task' "
     "is unknown"),
    ("--gin.config.TrainConfig.xla_cpu_pin='AVX3'", "error: TrainConfig.xla_cpu_pin='AVX3' is not an XLA:CPU ISA"),
])
def test_cli_startup_errors_are_the_last_line_printed(binding, message, tmp_path):
    """A failed start-up ends with the project's one line, on stdout and stderr together."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "peer_jax.train", "--gin_file=configs/runs/tiny_cpu.gin", f"--workdir={tmp_path}",
           "--gin.config.TrainConfig.num_steps=2", binding]
    env = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""}
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600)
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert p.returncode == 2 and lines[-1].startswith(message), p.stdout[-2000:]
    assert "Traceback" not in p.stdout
