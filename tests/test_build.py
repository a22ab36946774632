"""The one set-up (peer_jax/training/build.py): configuration checks before anything compiles,
and the train state derived from its abstract description."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from peer_jax import gin_utils, sharding
from peer_jax.layers.peer import PEER
from peer_jax.models.transformer import Transformer
from peer_jax.training import build as build_lib, optim, step as step_lib
from peer_jax.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent

# (field, bad value, what the one-line message must say)
BAD = [
    ("num_steps", 0, "TrainConfig.num_steps=0 must be an integer ≥ 1"),
    ("num_steps", -5, "TrainConfig.num_steps=-5 must be an integer ≥ 1"),
    ("batch_size", 0, "TrainConfig.batch_size=0 must be an integer ≥ 1"),
    ("grad_accum_steps", 0, "TrainConfig.grad_accum_steps=0 must be an integer ≥ 1"),
    ("seq_len", 0, "TrainConfig.seq_len=0 must be an integer ≥ 1"),
    ("log_every", 0, "TrainConfig.log_every=0 must be an integer ≥ 1"),
    ("eval_every", -1, r"TrainConfig.eval_every=-1 must be an integer ≥ 0 .*0 = no evals"),
    ("checkpoint_every", 0, "TrainConfig.checkpoint_every=0 must be an integer ≥ 1"),
    ("keep_checkpoints", 0, "TrainConfig.keep_checkpoints=0 must be an integer ≥ 1"),
    ("vocab_multiple", 0, "TrainConfig.vocab_multiple=0 must be an integer ≥ 1"),
    ("eval_batches", 0, "TrainConfig.eval_batches=0 must be an integer ≥ 1, or None"),
    ("final_eval_batches", -1, "TrainConfig.final_eval_batches=-1 must be an integer ≥ 1, or None"),
    ("eval_batch_size", 0, "TrainConfig.eval_batch_size=0 must be an integer ≥ 1, or None"),
    ("xla_cpu_threads", 0, "TrainConfig.xla_cpu_threads=0 must be an integer ≥ 1, or None"),
    ("batch_size", 2.5, "TrainConfig.batch_size=2.5 must be an integer"),
    ("batch_size", 30, "TrainConfig.batch_size=30 is not divisible by TrainConfig.grad_accum_steps=4"),
    ("nonfinite", "ignore", "TrainConfig.nonfinite='ignore': use 'stop' or 'skip'"),
    ("vocabulary", "bytes", "TrainConfig.vocabulary='bytes' is unknown; use 'byte' or 'spm'"),
    ("mesh_shape", (0, 1, 1), r"TrainConfig.mesh_shape=\(0, 1, 1\): give 3 integers"),
    ("mesh_shape", (-1, -1, 1), r"TrainConfig.mesh_shape=\(-1, -1, 1\): give 3 integers"),
    ("mesh_shape", (-1, 1), r"TrainConfig.mesh_shape=\(-1, 1\): give 3 integers"),
    ("mesh_shape", (-2, 1, 1), r"TrainConfig.mesh_shape=\(-2, 1, 1\): give 3 integers"),
    ("sharding_rules", "fdsp", "TrainConfig.sharding_rules='fdsp' is unknown; use one of"),
    ("train_task", "kvj", "TrainConfig.train_task: task 'kvj' is unknown; use one of"),
    ("eval_tasks", ("kjv", "pydocs"), "TrainConfig.eval_tasks: task 'pydocs' is unknown"),
    ("eval_tasks", "kjv", r"TrainConfig.eval_tasks='kjv': give a list of task names, e.g. \['kjv'\]"),
    ("streaming", True, "TrainConfig.streaming=True needs a TFDS corpus"),
    ("profile_steps", (5, 3), r"TrainConfig.profile_steps=\(5, 3\): use \(first, last\) with 1 ≤ first ≤ last"),
    ("profile_steps", (0, 3), r"TrainConfig.profile_steps=\(0, 3\)"),
    ("peak_flops_per_device", 0.0, "TrainConfig.peak_flops_per_device=0.0 must be > 0"),
]


@pytest.mark.parametrize("field, value, message", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_each_bad_setting_is_one_line_naming_it(field, value, message):
    cfg = TrainConfig(grad_accum_steps=4 if field == "batch_size" and value == 30 else 1)
    with pytest.raises(ValueError, match=message) as info:
        build_lib.validate(dataclasses.replace(cfg, **{field: value}))
    assert "\n" not in str(info.value)


def test_the_defaults_and_the_documented_off_values_are_valid():
    build_lib.validate(TrainConfig())
    build_lib.validate(TrainConfig(eval_every=0, eval_batches=None, final_eval_batches=None, profile_steps=(2, 2),
                                   mesh_shape=[1, -1, 1], eval_tasks=["kjv", "tfds:c4/en:3.1.0"]))


@pytest.mark.parametrize("name, value", [("warmup_steps", -1), ("peak_lr", 0.0), ("final_lr_fraction", -0.1),
                                         ("weight_decay", -1.0), ("b2", 1.0), ("eps", 0.0), ("grad_clip_norm", 0.0)])
def test_bad_optimizer_settings_name_the_gin_binding(name, value):
    with pytest.raises(ValueError, match=rf"optim\.make_optimizer\.{name}={value!r} is out of range"):
        optim.make_optimizer(10, **{name: value})


def test_a_bad_optimizer_binding_is_one_line_from_build():
    gin_utils.parse(["configs/runs/tiny_cpu.gin"], ["optim.make_optimizer.warmup_steps = -1"])
    try:
        cfg = gin.get_configurable(TrainConfig)()
        with pytest.raises(ValueError, match="optim.make_optimizer.warmup_steps=-1 is out of range") as info:
            build_lib.build(cfg, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    finally:
        gin.clear_config()
    assert "\n" not in str(info.value)


def test_a_batch_that_does_not_split_over_the_mesh_fails_in_build():
    mesh = sharding.make_mesh((-1, 1, 1))  # the 8 test devices
    with pytest.raises(ValueError, match="micro batch .* not divisible by the 8 data-parallel devices"):
        build_lib.build(TrainConfig(batch_size=12), mesh)
    with pytest.raises(ValueError, match="TrainConfig.eval_batch_size=12 is not divisible by the 8"):
        build_lib.build(TrainConfig(batch_size=16, eval_batch_size=12), mesh)


def test_the_train_command_stops_before_compiling(tmp_path):
    """A new user's zero, through the CLI: one line, exit status 2, nothing compiled or written."""
    cmd = [sys.executable, "-m", "peer_jax.train", "--gin_file=configs/runs/tiny_cpu.gin",
           f"--workdir={tmp_path / 'run'}", "--gin.config.TrainConfig.checkpoint_every=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: TrainConfig.checkpoint_every=0 must be an integer ≥ 1"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "compile_report.json").exists()


ALL_RUN_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.gin")
                         if p.parent.name not in ("models", "ablations"))


def test_every_committed_run_configuration_validates():
    assert "configs/runs/tiny_cpu.gin" in ALL_RUN_CONFIGS
    for path in ALL_RUN_CONFIGS:
        gin_utils.parse([path], [])
        try:
            build_lib.validate(gin.get_configurable(TrainConfig)())
        finally:
            gin.clear_config()


def _factory():
    return functools.partial(Transformer, num_layers=2, d_model=32, num_heads=2,
                             sparse_ffw=functools.partial(PEER, num_experts=16**2, heads=2, top_k=4, d_key=16))


def test_the_real_state_is_the_abstract_state_filled_in():
    """`init()` gives exactly the shapes, dtypes and shardings of the abstract state, and the
    parameters a plain construction of the model gives for the seed: jitted, unsharded, with no
    optimizer (eager op-by-op construction rounds a few values differently, by one ulp)."""
    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.RULES_DEFAULT
    tx, _ = optim.make_optimizer(10)
    spec = step_lib.train_state_spec(_factory(), tx, 64, 16, 3, mesh, rules)
    state = spec.init()
    assert jax.tree.structure(state) == jax.tree.structure(spec.abstract)
    for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(spec.abstract)):
        assert (x.shape, x.dtype, x.sharding) == (a.shape, a.dtype, a.sharding)
    assert any(len(set(s.spec) - {None}) for s in jax.tree.leaves(spec.shardings["params"]))  # something is split
    plain = jax.jit(lambda: nnx.to_pure_dict(nnx.state(_factory()(64, rngs=nnx.Rngs(params=3)), nnx.Param)))()
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]))
    assert int(state["step"]) == 0 and spec.setup.expert_mass_shapes
