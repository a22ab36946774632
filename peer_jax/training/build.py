"""One set-up for every entry point: training, eval, sampling and the ahead-of-time compile.

`build(cfg, mesh)` checks the whole `TrainConfig` (`validate`, then what needs the mesh:
`check_batch`), and returns a `Built`: mesh and rules, vocabulary, optimizer, the train
state as a `step.StateSpec` (abstract state, shardings, and the jitted initialiser of the
real one) and the jitted train and eval steps. Nothing is allocated or compiled by `build`:

* training (`training/loop.py`) creates the state with `built.init_state()` and compiles the
  step against `built.abstract_batch()`;
* eval and sampling (`peer_jax/eval.py`, `peer_jax/sample.py`) restore a checkpoint into
  `built.abstract_state`;
* the AOT compile (`peer_jax/aot.py`) lowers `built.train_step` against the abstract state and
  batch on compile-only TPU devices.

Every bad setting is a ValueError whose one line names the setting and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from peer_jax import sharding
from peer_jax.training import step as step_lib
from peer_jax.training.config import TrainConfig

NONFINITE = ("stop", "skip")
VOCABULARIES = ("byte", "spm")


def _int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _at_least(cfg: TrainConfig, name: str, low: int, fix: str, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if not _int(value) or value < low:
        raise ValueError(f"TrainConfig.{name}={value!r} must be an integer ≥ {low}{fix}.")


def validate(cfg: TrainConfig) -> None:
    """Checks every TrainConfig setting that can be checked without devices or data (counts,
    periods, sizes, names); raises ValueError naming the first bad one and its fix."""
    _at_least(cfg, "num_steps", 1, " (the number of optimizer steps)")
    _at_least(cfg, "batch_size", 1, " (sequences per optimizer step)")
    _at_least(cfg, "grad_accum_steps", 1, " (1 = no accumulation)")
    _at_least(cfg, "seq_len", 1, " (tokens per sequence)")
    _at_least(cfg, "log_every", 1, " (steps between logged metrics)")
    _at_least(cfg, "eval_every", 0, " (steps between evals; 0 = no evals)")
    _at_least(cfg, "checkpoint_every", 1, " (steps between checkpoints)")
    _at_least(cfg, "keep_checkpoints", 1, " (checkpoints kept on disk)")
    _at_least(cfg, "vocab_multiple", 1, " (the model vocabulary is the tokenizer's size rounded up to it)")
    for name in ("eval_batches", "final_eval_batches"):
        _at_least(cfg, name, 1, ", or None for the whole split", optional=True)
    _at_least(cfg, "eval_batch_size", 1, ", or None for the training micro batch", optional=True)
    _at_least(cfg, "xla_cpu_threads", 1, ", or None for every CPU the process may use", optional=True)
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is not divisible by "
                         f"TrainConfig.grad_accum_steps={cfg.grad_accum_steps}; change one of them.")
    if cfg.nonfinite not in NONFINITE:
        raise ValueError(f"TrainConfig.nonfinite={cfg.nonfinite!r}: use 'stop' or 'skip'.")
    if cfg.vocabulary not in VOCABULARIES:
        raise ValueError(f"TrainConfig.vocabulary={cfg.vocabulary!r} is unknown; use 'byte' or 'spm'.")
    _check_mesh_shape(cfg.mesh_shape)
    if isinstance(cfg.sharding_rules, str) and cfg.sharding_rules not in sharding.RULE_PRESETS:
        raise ValueError(f"TrainConfig.sharding_rules={cfg.sharding_rules!r} is unknown; use one of "
                         f"{sorted(sharding.RULE_PRESETS)} or a tuple of (logical_name, mesh_axes) pairs.")
    _check_tasks(cfg)
    if cfg.profile_steps is not None:
        steps = tuple(cfg.profile_steps)
        if len(steps) != 2 or not all(_int(s) for s in steps) or not 1 <= steps[0] <= steps[1]:
            raise ValueError(f"TrainConfig.profile_steps={steps}: use (first, last) with 1 ≤ first ≤ last "
                             "(1-based step numbers, inclusive), or None.")
    if cfg.peak_flops_per_device is not None and not cfg.peak_flops_per_device > 0:
        raise ValueError(f"TrainConfig.peak_flops_per_device={cfg.peak_flops_per_device!r} must be > 0 (FLOP/s), "
                         "or None for peer_jax.hardware's table.")


def _check_mesh_shape(shape: Sequence[int]) -> None:
    entries = tuple(shape) if isinstance(shape, (list, tuple)) else None
    if (entries is None or len(entries) != len(sharding.MESH_AXES) or not all(_int(s) for s in entries)
            or any(s == 0 or s < -1 for s in entries) or entries.count(-1) > 1):
        raise ValueError(f"TrainConfig.mesh_shape={shape!r}: give {len(sharding.MESH_AXES)} integers, one per axis "
                         f"{sharding.MESH_AXES}, each ≥ 1 or at most one -1 (the remaining devices), e.g. (-1, 1, 1).")


def _check_tasks(cfg: TrainConfig) -> None:
    from peer_jax.data import eval_tasks, tasks as tasks_lib  # noqa: F401  (eval_tasks registers the file sets)

    known = tasks_lib.task_names()
    for name, value in (("train_task", [cfg.train_task]), ("eval_tasks", cfg.eval_tasks)):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"TrainConfig.{name}={value!r}: give a list of task names, e.g. [{value!r}].")
        for task in value:
            if not isinstance(task, str) or (task not in known and tasks_lib.tfds_name(task) is None):
                raise ValueError(f"TrainConfig.{name}: task {task!r} is unknown; use one of {known} or 'tfds:NAME'.")
    if cfg.streaming and tasks_lib.tfds_name(cfg.train_task) is None:
        raise ValueError(f"TrainConfig.streaming=True needs a TFDS corpus: train_task={cfg.train_task!r} is "
                         "packed in memory. Use 'c4' or 'tfds:NAME', or set streaming=False.")


def check_batch(cfg: TrainConfig, mesh, rules) -> int:
    """Checks the train and eval batches against the data-parallel devices; returns the micro batch."""
    micro = cfg.batch_size // cfg.grad_accum_steps
    dp = sharding.data_parallel_size(mesh, rules)
    if micro % dp:
        raise ValueError(
            f"the micro batch (TrainConfig.batch_size / grad_accum_steps = {micro}) is not divisible by the "
            f"{dp} data-parallel devices of mesh {dict(mesh.shape)}; change TrainConfig.batch_size or "
            "TrainConfig.mesh_shape.")
    if cfg.eval_batch_size is not None and cfg.eval_batch_size % dp:
        raise ValueError(f"TrainConfig.eval_batch_size={cfg.eval_batch_size} is not divisible by the {dp} "
                         f"data-parallel devices of mesh {dict(mesh.shape)}; use a multiple of {dp}.")
    return micro


def model_vocab_size(cfg: TrainConfig, vocab_size: int) -> int:
    """The model's vocabulary: the tokenizer's `vocab_size` rounded up to `vocab_multiple`."""
    return -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple


def run_meta(cfg: TrainConfig, vocab) -> dict:
    """What must match between a checkpoint and the run that resumes from it."""
    from peer_jax.data import vocab as vocab_lib

    return {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "vocab": vocab_lib.vocab_id(vocab),
            "train_task": cfg.train_task, "data_seed": cfg.data_seed}


@dataclasses.dataclass(frozen=True)
class Built:
    """What `build` returns; see the module docstring for who uses what."""

    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    rules: sharding.LogicalRules
    vocab: Any  # the tokenizer; None when `build` was given its size instead
    model_vocab: int
    micro_batch: int
    eval_batch_size: int  # global rows of an eval batch
    tx: Any
    schedule: Any
    spec: step_lib.StateSpec
    train_step: Any  # jitted: (state, batch) -> (state, metrics), the state donated
    eval_step: Any  # jitted: (params, model_state, batch) -> sums

    @property
    def setup(self) -> step_lib.ModelSetup:
        return self.spec.setup

    @property
    def abstract_state(self) -> step_lib.TrainState:
        return self.spec.abstract

    @property
    def shardings(self) -> step_lib.TrainState:
        return self.spec.shardings

    @property
    def batch_sharding(self) -> NamedSharding:
        return step_lib.batch_sharding(self.mesh, self.rules)

    def init_state(self) -> step_lib.TrainState:
        """The initial train state (parameters from `TrainConfig.seed`), each array in its sharding."""
        return self.spec.init()

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """A global training batch as ShapeDtypeStructs in its sharding (to lower the train step)."""
        shape = (self.cfg.batch_size, self.cfg.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "weights" else np.int32, sharding=self.batch_sharding)
                for k in step_lib.BATCH_KEYS}

    def abstract_model(self) -> nnx.Module:
        """The model with ShapeDtypeStruct variables (for counting FLOPs and parameters)."""
        return nnx.eval_shape(lambda: self.cfg.model(self.model_vocab, rngs=nnx.Rngs(0)))

    def meta(self) -> dict:
        return run_meta(self.cfg, self.vocab)

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules the steps are traced and run under."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield


def build(cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None, *, vocab_size: int | None = None) -> Built:
    """The set-up of a run configured by `cfg` on `mesh` (default: `TrainConfig.mesh_shape` over
    all devices). `vocab_size` gives the tokenizer's size instead of loading the tokenizer (an
    ahead-of-time compile of a run whose SentencePiece model is remote)."""
    from peer_jax.data import vocab as vocab_lib

    validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh_shape) if mesh is None else mesh
    rules = sharding.get_rules(cfg.sharding_rules)
    micro = check_batch(cfg, mesh, rules)
    vocab = None
    if vocab_size is None:
        vocab = vocab_lib.vocabulary(cfg.vocabulary, cfg.spm_path)
        vocab_size = vocab.vocab_size
    model_vocab = model_vocab_size(cfg, vocab_size)
    try:
        tx, schedule = cfg.optimizer(cfg.num_steps)
    except ValueError as e:  # gin appends "In call to configurable ..." lines; the first names the setting
        raise ValueError(str(e).strip().splitlines()[0]) from e
    spec = step_lib.train_state_spec(cfg.model, tx, model_vocab, cfg.seq_len, cfg.seed, mesh, rules)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(spec.setup, tx, cfg.grad_accum_steps, skip_nonfinite=cfg.nonfinite == "skip"),
        spec.shardings, spec.setup)
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(spec.setup), spec.shardings, spec.setup)
    return Built(cfg=cfg, mesh=mesh, rules=rules, vocab=vocab, model_vocab=model_vocab, micro_batch=micro,
                 eval_batch_size=cfg.eval_batch_size or micro, tx=tx, schedule=schedule, spec=spec,
                 train_step=train_step, eval_step=eval_step)
