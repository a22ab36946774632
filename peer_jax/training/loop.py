"""The training loop: set-up checks, AOT compile, train/eval/checkpoint, clean preemption."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from etils import epath

import jax
import numpy as np
from flax import nnx

from peer_jax import flops as flops_lib, sharding
from peer_jax.data import eval_tasks as eval_tasks_lib, pipeline, vocab as vocab_lib
from peer_jax.layers import expert_stats
from peer_jax.training import checkpoint as ckpt
from peer_jax.training import evaluate as eval_lib
from peer_jax.training import metrics as metrics_lib
from peer_jax.training import step as step_lib
from peer_jax.training.config import TrainConfig

log = logging.getLogger("peer_jax")


class NonFiniteLossError(RuntimeError):
    pass


def check_batch(cfg: TrainConfig, mesh, rules) -> int:
    """Validates batch_size against accumulation and the data-parallel mesh; returns the micro batch."""
    if cfg.batch_size < 1 or cfg.grad_accum_steps < 1:
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} and grad_accum_steps={cfg.grad_accum_steps} must be ≥ 1.")
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is not divisible by "
                         f"TrainConfig.grad_accum_steps={cfg.grad_accum_steps}.")
    micro = cfg.batch_size // cfg.grad_accum_steps
    spec = sharding.logical_to_spec(("batch",), rules)[0]
    axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
    dp = math.prod(mesh.shape[a] for a in axes)
    if micro % dp:
        raise ValueError(
            f"the micro batch (TrainConfig.batch_size / grad_accum_steps = {micro}) is not divisible by the "
            f"{dp} data-parallel devices of mesh {dict(mesh.shape)}; change TrainConfig.batch_size or "
            "TrainConfig.mesh_shape.")
    return micro


def _train_iterator(cfg: TrainConfig, vocab):
    kw = dict(seed=cfg.data_seed, process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.streaming:
        return pipeline.StreamingBatches(cfg.train_task, cfg.train_split, cfg.seq_len, vocab, cfg.batch_size, **kw)
    arrays = pipeline.packed_arrays(cfg.train_task, cfg.train_split, cfg.seq_len, vocab)
    return pipeline.ArrayBatches(arrays, cfg.batch_size, **kw)


def _compile_report(compiled) -> dict:
    out = {}
    mem = compiled.memory_analysis()
    if mem is not None:
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"):
            out[k] = int(getattr(mem, k, 0))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        # XLA analyses the SPMD-partitioned program: FLOPs of one device's share of the step.
        out["flops_per_device_step_xla"] = float(cost.get("flops", 0.0))
    return out


class _Preemption:
    """Turns SIGTERM into a flag checked after each step (finish the step, save, exit 0)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All hosts agree on the step at which to stop (JAX's preemption sync point).
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step)) or self.requested
        return self.requested


def run_meta(cfg: TrainConfig, vocab) -> dict:
    """What must match between a checkpoint and the run that resumes from it."""
    return {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "vocab": vocab_lib.vocab_id(vocab),
            "train_task": cfg.train_task, "data_seed": cfg.data_seed}


def train(cfg: TrainConfig, workdir: str, *, on_start=None, on_step=None) -> dict:
    """Runs (or resumes) a training run in `workdir`; returns the final metrics."""
    workdir_p = epath.Path(workdir)
    workdir_p.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh_shape)
    rules = sharding.get_rules(cfg.sharding_rules)
    check_batch(cfg, mesh, rules)
    if cfg.nonfinite not in ("stop", "skip"):
        raise ValueError(f"TrainConfig.nonfinite={cfg.nonfinite!r}: use 'stop' or 'skip'.")
    vocab = vocab_lib.vocabulary(cfg.vocabulary, cfg.spm_path)
    train_it = _train_iterator(cfg, vocab)
    eval_bs = cfg.eval_batch_size or cfg.batch_size // cfg.grad_accum_steps
    if cfg.eval_data_dir:
        eval_tasks_lib.eval_data_dir(cfg.eval_data_dir)

    def eval_inputs(task):
        return pipeline.eval_stream(task, cfg.eval_split, cfg.seq_len, vocab, eval_bs, cfg.eval_batches,
                                    process_index=jax.process_index(), process_count=jax.process_count())

    for task in cfg.eval_tasks:  # fail at start-up, not at the first eval, if a set is missing
        next(eval_inputs(task))
    tx, schedule = cfg.optimizer(cfg.num_steps)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model_vocab = -(-vocab.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
        setup, state, shardings = step_lib.create_train_state(cfg.model, tx, model_vocab, cfg.seq_len, cfg.seed,
                                                              mesh, rules)
        train_step = step_lib.jit_train_step(
            step_lib.make_train_step(setup, tx, cfg.grad_accum_steps, skip_nonfinite=cfg.nonfinite == "skip"),
            shardings, setup)
        eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(setup), shardings, setup)

        mngr = ckpt.manager(str(workdir_p / "checkpoints"), keep=cfg.keep_checkpoints)
        meta = run_meta(cfg, vocab)
        restored = ckpt.restore(mngr, state, shardings, expect_meta=meta)
        if restored is not None:
            state, data_state, _ = restored
            train_it.set_state(data_state)
            log.info("resumed from step %d", int(state["step"]))
        start = int(state["step"])

        batch_spec = step_lib.batch_sharding(mesh, rules)
        abstract_batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len),
                                                  np.float32 if k == "weights" else np.int32, sharding=batch_spec)
                          for k in step_lib.BATCH_KEYS}
        step_fn = train_step.lower(state, abstract_batch).compile()
        report = _compile_report(step_fn)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
        # Analytic (peer_jax.flops convention); XLA's count undercounts loops (lax.scan bodies once).
        abstract_model = nnx.eval_shape(lambda: cfg.model(model_vocab, rngs=nnx.Rngs(0)))
        train_flops_per_token = flops_lib.train_flops_per_token(abstract_model, cfg.seq_len,
                                                                cfg.batch_size // cfg.grad_accum_steps)
        report["train_flops_per_token"] = train_flops_per_token
        log.info("params=%d compile=%s", n_params, json.dumps(report))
        if jax.process_index() == 0:
            (workdir_p / "compile_report.json").write_text(json.dumps({"params": n_params, **report}, indent=1))

        if on_start is not None:
            on_start()
        writer = metrics_lib.MetricsWriter(workdir, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                           resume_step=start)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = None
        if cfg.progress_bar and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.num_steps, initial=start, desc="train", dynamic_ncols=True)

        def run_eval(step: int) -> dict:
            row = {}
            for i, task in enumerate(cfg.eval_tasks):
                res = eval_lib.evaluate(eval_step, setup, state["params"], state["model_state"], eval_inputs(task))
                row.update({f"eval/{task}/{k}": v for k, v in res.items()})
                if i == 0:
                    row["eval_loss"], row["eval_ppl"] = res["loss"], res["ppl"]
            writer.write(step, row)
            return row

        def check_finite(at_step: int, finite) -> None:
            if cfg.nonfinite == "stop" and not bool(finite):
                writer.close()
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {at_step}; the last good checkpoint is kept in "
                    f"{workdir_p / 'checkpoints'}. Lower the learning rate, or set TrainConfig.nonfinite='skip' "
                    "to skip such updates.")

        last_eval: dict = {}
        t_log, steps_since = time.perf_counter(), 0
        step, pending = start, None
        with _Preemption() as preempt:
            while step < cfg.num_steps:
                batch = step_lib.host_batch(next(train_it), setup)
                state, metrics = step_fn(state, batch)
                step += 1
                steps_since += 1
                if pending is not None:  # checked one step late, so the host never stalls the device
                    check_finite(*pending)
                pending = (step, metrics["finite"])
                if on_step is not None:
                    on_step(step)
                if step % cfg.log_every == 0 or step == cfg.num_steps:
                    m = jax.device_get(metrics)
                    check_finite(step, m.pop("finite"))
                    dt = time.perf_counter() - t_log
                    row = {**m, "lr": float(schedule(step - 1)), "tokens_per_sec": steps_since * tokens_per_step / dt,
                           "step_time_s": dt / steps_since}
                    row["model_flops_per_sec"] = train_flops_per_token * row["tokens_per_sec"]
                    if cfg.peak_flops_per_device:
                        row["mfu"] = row["model_flops_per_sec"] / (cfg.peak_flops_per_device * jax.device_count())
                    masses = jax.device_get(state["expert_mass"])
                    for k, mass in masses.items():
                        layer = k.rsplit("/", 1)[0]
                        row[f"{layer}/usage"] = float(expert_stats.usage(mass))
                        row[f"{layer}/unevenness"] = float(expert_stats.unevenness(mass))
                    if masses:
                        state["expert_mass"] = jax.tree.map(lambda x: x * 0, state["expert_mass"])
                    writer.write(step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}")
                    t_log, steps_since = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.num_steps):
                    last_eval = run_eval(step)
                stop = preempt.should_stop(step)
                if step % cfg.checkpoint_every == 0 or step == cfg.num_steps or stop:
                    check_finite(*pending)
                    ckpt.save(mngr, step, state, train_it.get_state(), meta, force=True)
                if stop:
                    log.warning("SIGTERM: saved a checkpoint at step %d and stopped", step)
                    break
        if not last_eval and cfg.eval_every and step == cfg.num_steps:
            last_eval = run_eval(step)  # resumed after the final checkpoint but before its eval
        mngr.wait_until_finished()
        mngr.close()
        if bar is not None:
            bar.close()
        writer.close()
    return {"step": step, "params": n_params, **last_eval}
