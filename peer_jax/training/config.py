"""The gin-configured run description (`config.TrainConfig.*` bindings).

Kept apart from `peer_jax/train.py` so that gin's dynamic registration configures the same
class object whether training runs as `python -m peer_jax.train` or is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from peer_jax.models.transformer import Transformer
from peer_jax.training.optim import make_optimizer


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs besides the model hyperparameters.

    `model` is a factory `model(vocab_size, rngs=...)` (gin: `@transformer.Transformer`);
    `optimizer` is a factory `optimizer(total_steps) -> (tx, schedule)`.
    """

    model: Callable = Transformer
    optimizer: Callable = make_optimizer
    # Data.
    train_task: str = "kjv"
    train_split: str = "train"
    eval_tasks: Sequence[str] = ("kjv",)
    eval_split: str = "validation"
    eval_data_dir: str | None = None  # file-based eval sets (data/eval_tasks.py); None: $PEER_JAX_EVAL_DATA
    vocabulary: str = "byte"  # 'byte' or 'spm'
    spm_path: str | None = None
    vocab_multiple: int = 128  # model vocab = vocabulary size rounded up (shardable, MXU-friendly)
    seq_len: int = 128
    batch_size: int = 32  # global, in sequences, per optimizer step
    grad_accum_steps: int = 1
    streaming: bool = False  # True for corpora read with Grain from TFDS ArrayRecord files (C4, 'tfds:NAME')
    data_seed: int = 0
    # Schedule.
    num_steps: int = 200
    log_every: int = 10
    # Evals (training/loop.py): every `eval_every` steps on each task's fixed subset, its first
    # `eval_batches` batches (`eval_subset/<task>/...`); at num_steps on the whole split unless
    # `final_eval_batches` caps it (`eval/<task>/...`, `eval_loss`, the figures runs report).
    eval_every: int = 100
    eval_batches: int | None = 16  # None = the whole eval split
    final_eval_batches: int | None = None  # None = the whole eval split
    eval_batch_size: int | None = None  # default: batch_size
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True  # write checkpoints in a background thread while training goes on
    # Parallelism.
    mesh_shape: Sequence[int] = (-1, 1, 1)  # (data, expert, model); -1 = the remaining devices
    sharding_rules: str = "default"
    seed: int = 0
    # Logging.
    wandb_project: str | None = None  # None: wandb disabled; else WANDB_MODE (default offline)
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops_per_device: float | None = None  # None: peer_jax.hardware's table (TPU/H100/H200); CPU: no `mfu`
    profile_steps: Sequence[int] | None = None  # (first, last) 1-based steps: jax.profiler trace in workdir/profile
    # JAX's persistent compilation cache (local path or gs://): a restart or the next point of a
    # sweep with the same program loads it instead of compiling (minutes at paper scale).
    compilation_cache_dir: str | None = None
    # Reproducibility across hosts (peer_jax/host.py, docs/reproducibility.md): compile XLA:CPU
    # code for this ISA level (e.g. "AVX2") and use no kernels that YNNPACK picks per CPU; and run
    # XLA:CPU's intra-op pool with this many threads (the process uses that many CPUs). Both set:
    # the same bits on hosts of one CPU model whatever their ISA extensions and core counts (at
    # least these), and ulp-level agreement across CPU models. None: whatever the host offers.
    # No effect on TPU/GPU computations.
    xla_cpu_pin: str | None = None
    xla_cpu_threads: int | None = None
    # Faults.
    nonfinite: str = "stop"  # 'stop' or 'skip' (skip the update, keep going)
