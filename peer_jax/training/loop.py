"""The training loop: a small `Trainer` whose steps are named methods.

`Trainer(cfg, workdir).run()` sets up (checks, data, state, jitted steps), restores the
latest checkpoint, compiles ahead of time and reports memory and FLOPs, then runs
step → log → eval → save → stop-check until `num_steps` or a preemption. Multi-host runs
need nothing else: every host runs the same loop; what a host could decide alone (when to
stop, how many eval steps, which rows of the batch it reads) is agreed or derived from global
state (peer_jax/multihost.py, peer_jax/training/preemption.py).
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np
from etils import epath

from peer_jax import flops as flops_lib, hardware, host, multihost, runtime
from peer_jax.data import pipeline, streaming, tasks as tasks_lib
from peer_jax.layers import expert_stats
from peer_jax.training import build as build_lib, checkpoint as ckpt
from peer_jax.training import evaluate as eval_lib
from peer_jax.training import metrics as metrics_lib
from peer_jax.training import profiling
from peer_jax.training import step as step_lib
from peer_jax.training.config import TrainConfig
from peer_jax.training.preemption import Preemption

log = logging.getLogger("peer_jax")


class NonFiniteLossError(RuntimeError):
    pass


def compile_report(compiled) -> dict:
    """XLA's memory analysis and cost-analysis FLOPs of a compiled step."""
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


class Trainer:
    """One training run in `workdir` (resumed if it holds checkpoints)."""

    def __init__(self, cfg: TrainConfig, workdir: str, *, on_start=None, on_step=None,
                 restore_step: int | None = None):
        self.cfg, self.workdir, self.restore_step = cfg, epath.Path(workdir), restore_step
        self.on_start, self.on_step = on_start, on_step
        self.last_eval: dict = {}
        self.last_eval_step: int | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        build_lib.validate(cfg)  # every setting, before anything starts
        host.pin(cfg)  # first: XLA reads its flags and sizes its thread pool when the backend starts
        self.workdir.mkdir(parents=True, exist_ok=True)
        runtime.configure_compilation_cache(cfg.compilation_cache_dir)
        self.built = built = build_lib.build(cfg)
        shard, shards = multihost.process_row_block(built.batch_sharding, (cfg.batch_size, cfg.seq_len))
        kw = dict(seed=cfg.data_seed, shard_index=shard, num_shards=shards)
        if cfg.streaming:
            self.train_it = streaming.GrainBatches(tasks_lib.tfds_name(cfg.train_task), cfg.train_split, cfg.seq_len,
                                                   built.vocab, cfg.batch_size, **kw)
        else:
            arrays = pipeline.packed_arrays(cfg.train_task, cfg.train_split, cfg.seq_len, built.vocab)
            self.train_it = pipeline.ArrayBatches(arrays, cfg.batch_size, **kw)
        self.eval_shard = multihost.process_row_block(built.batch_sharding, (built.eval_batch_size, cfg.seq_len))
        for task in cfg.eval_tasks:  # fail at start-up, not at the first eval, if a set is missing
            next(pipeline.eval_stream(task, cfg.eval_split, cfg.seq_len, built.vocab, built.eval_batch_size, 1,
                                      shard_index=self.eval_shard[0], num_shards=self.eval_shard[1],
                                      eval_data_dir=cfg.eval_data_dir), None)
        self.state = built.init_state()
        multihost.barrier("setup_done")  # before orbax's first cross-host sync (a gloo collective)
        self.mngr = ckpt.manager(str(self.workdir / "checkpoints"), keep=cfg.keep_checkpoints,
                                 asynchronous=cfg.async_checkpointing)
        self.meta = built.meta()

    def restore(self) -> int:
        """Restores the latest checkpoint (or `restore_step`, setting newer ones aside); returns the step."""
        with ckpt.close_on_error(self.mngr):
            restored = ckpt.restore(self.mngr, self.state, self.built.shardings, step=self.restore_step,
                                    expect_meta=self.meta, data_iterator=self.train_it)
        if restored is not None and self.restore_step is not None:
            moved = ckpt.set_aside_newer(self.mngr, self.restore_step)
            if moved:
                log.warning("resuming from step %d: newer checkpoints set aside as %s", self.restore_step, moved)
        if restored is not None:
            self.state, _ = restored
            log.info("resumed from step %d", int(self.state["step"]))
        return int(self.state["step"])

    def compile(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.step_fn = self.built.train_step.lower(self.state, self.built.abstract_batch()).compile()
        report = {**compile_report(self.step_fn), "compile_s": time.perf_counter() - t0}
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state["params"]))
        # Analytic (peer_jax.flops convention); XLA's count undercounts loops (lax.scan bodies once).
        self.train_flops_per_token = flops_lib.train_flops_per_token(self.built.abstract_model(), cfg.seq_len,
                                                                     self.built.micro_batch)
        report["train_flops_per_token"] = self.train_flops_per_token
        report["host"] = host.describe(cfg.xla_cpu_pin)
        log.info("params=%d compile=%s", self.n_params, json.dumps(report))
        if jax.process_index() == 0:
            (self.workdir / "compile_report.json").write_text(json.dumps({"params": self.n_params, **report}, indent=1))

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> dict:
        """One optimizer step; returns the (device) metrics."""
        t0 = time.perf_counter()
        batch = step_lib.host_batch(next(self.train_it), self.built.setup, self.cfg.batch_size)
        t1 = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, batch)
        self.input_wait_s += t1 - t0
        return metrics

    def log_metrics(self, step: int, metrics: dict) -> None:
        cfg = self.cfg
        m = jax.device_get(metrics)
        self.check_finite(step, m.pop("finite"))
        dt = time.perf_counter() - self.t_log
        n = self.steps_since
        row = {**m, "lr": float(self.built.schedule(step - 1)), "tokens_per_sec": n * cfg.batch_size * cfg.seq_len / dt,
               "step_time_s": dt / n, "input_wait_s": self.input_wait_s / n}
        if self.checkpoint_blocking_s:
            row["checkpoint_blocking_s"], self.checkpoint_blocking_s = self.checkpoint_blocking_s, 0.0
        row["model_flops_per_sec"] = self.train_flops_per_token * row["tokens_per_sec"]
        peak = cfg.peak_flops_per_device or hardware.peak_flops_per_device()  # known TPUs/GPUs; None on CPU
        if peak:
            row["mfu"] = row["model_flops_per_sec"] / (peak * jax.device_count())
        masses = jax.device_get(self.state["expert_mass"])
        for k, mass in masses.items():
            layer = k.rsplit("/", 1)[0]
            row.update({f"{layer}/{stat}": v for stat, v in expert_stats.summary(mass).items()})
        if masses:
            self.state["expert_mass"] = jax.tree.map(lambda x: x * 0, self.state["expert_mass"])
        self.writer.write(step, row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}")
        self.t_log, self.steps_since, self.input_wait_s = time.perf_counter(), 0, 0.0

    def evaluate(self, step: int) -> dict:
        """Intermediate evals read each task's fixed subset (its first `eval_batches` batches) and
        log `eval_subset/<task>/...`; the final one (step = num_steps) reads the whole split, or
        its first `final_eval_batches`, and logs `eval/<task>/...` and, for the first task,
        `eval_loss`/`eval_ppl`, plus the subset's figures from the same pass, so the subset
        curve ends at the final step too."""
        cfg = self.cfg
        final = step == cfg.num_steps
        log.info("%s eval at step %d", "final" if final else "subset", step)
        row, built = {}, self.built
        for i, task in enumerate(cfg.eval_tasks):
            full, subset = eval_lib.evaluate_task(
                built.eval_step, built.setup, self.state["params"], self.state["model_state"], task,
                split=cfg.eval_split, seq_len=cfg.seq_len, vocab=built.vocab, global_rows=built.eval_batch_size,
                shard=self.eval_shard, max_batches=cfg.final_eval_batches if final else cfg.eval_batches,
                prefix_batches=cfg.eval_batches if final else None, eval_data_dir=cfg.eval_data_dir)
            if final:
                row.update({f"eval/{task}/{k}": v for k, v in full.items()})
                if i == 0:
                    row["eval_loss"], row["eval_ppl"] = full["loss"], full["ppl"]
            row.update({f"eval_subset/{task}/{k}": v for k, v in (subset or full).items()})
        self.writer.write(step, row)
        self.last_eval, self.last_eval_step = row, step
        return row

    def check_finite(self, at_step: int, finite) -> None:
        if self.cfg.nonfinite == "stop" and not bool(finite):
            self.writer.close()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {at_step}; the last good checkpoint is kept in "
                f"{self.workdir / 'checkpoints'}. Lower the learning rate, or set TrainConfig.nonfinite='skip' "
                "to skip such updates.")

    def save(self, step: int) -> None:
        log.info("saving a checkpoint at step %d", step)
        t0 = time.perf_counter()
        ckpt.save(self.mngr, step, self.state, self.train_it, self.meta, force=True)
        self.checkpoint_blocking_s += time.perf_counter() - t0  # what the save stalled training for

    def run(self) -> dict:
        cfg = self.cfg
        self.setup()
        with self.built.context():
            start = self.restore()
            self.compile()
            if self.on_start is not None:
                self.on_start()
            self.writer = metrics_lib.MetricsWriter(str(self.workdir), tensorboard=cfg.tensorboard,
                                                    wandb_project=cfg.wandb_project, resume_step=start)
            self.bar = None
            if cfg.progress_bar and jax.process_index() == 0:
                from tqdm import tqdm

                self.bar = tqdm(total=cfg.num_steps, initial=start, desc="train", dynamic_ncols=True)
            self.t_log, self.steps_since, self.input_wait_s = time.perf_counter(), 0, 0.0
            self.checkpoint_blocking_s = 0.0
            step, pending = start, None
            profiler = profiling.StepProfiler(cfg.profile_steps, self.workdir, start_step=start, num_steps=cfg.num_steps)
            with Preemption(start) as preemption:
                while step < cfg.num_steps:
                    metrics = self.step()
                    step += 1
                    self.steps_since += 1
                    if pending is not None:  # checked one step late, so the host never stalls the device
                        self.check_finite(*pending)
                    pending = (step, metrics["finite"])
                    profiler.after_step(step, metrics)
                    if self.on_step is not None:
                        self.on_step(step)
                    if step % cfg.log_every == 0 or step == cfg.num_steps:
                        self.log_metrics(step, metrics)
                    if self.bar is not None:
                        self.bar.update(1)
                    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.num_steps):
                        self.evaluate(step)
                    stop = preemption.should_stop(step)
                    if step % cfg.checkpoint_every == 0 or step == cfg.num_steps or stop:
                        self.check_finite(*pending)
                        self.save(step)
                    if stop:
                        log.warning("SIGTERM: saved a checkpoint at step %d and stopped", step)
                        break
            if self.last_eval_step != step and cfg.eval_every and step == cfg.num_steps:
                self.evaluate(step)  # resumed after the final checkpoint but before its eval
            self.mngr.wait_until_finished()
            self.mngr.close()
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
        return {"step": step, "params": self.n_params, **self.last_eval}


def train(cfg: TrainConfig, workdir: str, *, on_start=None, on_step=None, restore_step: int | None = None) -> dict:
    """Runs (or resumes) a training run in `workdir`; returns the final metrics."""
    return Trainer(cfg, workdir, on_start=on_start, on_step=on_step, restore_step=restore_step).run()
