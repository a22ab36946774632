"""`python -m peer_jax.eval --gin_file=F --checkpoint_dir=DIR/checkpoints [--tasks=c4,lambada] [--step=N] [--distributed]`.

On a pod every host runs the same command with `--distributed`; each evaluates its block of
every batch, the hosts agree on the number of steps per task, and process 0 writes. Restores a checkpoint (latest or `--step`) into the run's shardings and reports token-level
loss and perplexity on each eval task (padding never counts; the last partial batch is padded
with weight-0 rows), plus expert usage/unevenness for PEER/PKM layers and load spread for MoE.
Prints a table and writes `eval_step<N>.json` next to the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import traceback

from etils import epath

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run_eval(cfg, checkpoint_dir: str, tasks: list[str], step: int | None = None,
             max_batches: int | None = None, batch_size: int | None = None) -> dict:
    """Returns {'step', 'tasks': {task: metrics}} for a checkpoint of a run configured by `cfg`."""
    import jax
    from flax import nnx

    from peer_jax import host, sharding
    from peer_jax.data import eval_tasks, pipeline, tasks as tasks_lib, vocab as vocab_lib
    from peer_jax.training import checkpoint as ckpt, evaluate as eval_lib, loop, step as step_lib

    host.pin(cfg)  # the training run's numerics; before the backend starts
    mesh = sharding.make_mesh(cfg.mesh_shape)
    rules = sharding.get_rules(cfg.sharding_rules)
    loop.check_batch(cfg, mesh, rules)
    if cfg.eval_data_dir:
        eval_tasks.eval_data_dir(cfg.eval_data_dir)
    vocab = vocab_lib.vocabulary(cfg.vocabulary, cfg.spm_path)
    model_vocab = -(-vocab.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    tx, _ = cfg.optimizer(cfg.num_steps)
    bs = batch_size or cfg.eval_batch_size or cfg.batch_size // cfg.grad_accum_steps
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup, abstract, shardings = step_lib.abstract_train_state(cfg.model, tx, model_vocab, cfg.seq_len, mesh, rules)
        mngr = ckpt.manager(checkpoint_dir, keep=cfg.keep_checkpoints)
        if mngr.latest_step() is None:
            raise FileNotFoundError(f"--checkpoint_dir={checkpoint_dir} holds no checkpoint.")
        with ckpt.close_on_error(mngr):
            state, _ = ckpt.restore(mngr, abstract, shardings, step=step, expect_meta=loop.run_meta(cfg, vocab))
        eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(setup), shardings, setup)
        shard, shards = loop.batch_shard(mesh, rules, cfg, bs)
        results = {}
        for task in tasks:
            batches = pipeline.eval_stream(task, cfg.eval_split, cfg.seq_len, vocab, bs, max_batches,
                                           shard_index=shard, num_shards=shards)
            results[task] = eval_lib.evaluate(eval_step, setup, state["params"], state["model_state"], batches,
                                              pipeline.empty_batch(bs // shards, cfg.seq_len), bs,
                                              hosts_agree=tasks_lib.tfds_name(task) is not None)
        mngr.close()
    return {"step": int(state["step"]), "tasks": results}


def format_table(result: dict) -> str:
    lines = [f"step {result['step']}", f"{'task':<14}{'loss':>9}{'ppl':>11}{'tokens':>12}  expert statistics"]
    for task, m in result["tasks"].items():
        extra = ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k not in ("loss", "ppl", "tokens"))
        lines.append(f"{task:<14}{m['loss']:>9.4f}{m['ppl']:>11.3f}{int(m['tokens']):>12d}  {extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from peer_jax import gin_utils, multihost, runtime

    def add_arguments(parser):
        parser.add_argument("--checkpoint_dir", required=True, help="the run's checkpoints directory")
        parser.add_argument("--tasks", default=None,
                            help="comma-separated eval tasks (default: the config's eval_tasks)")
        parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        parser.add_argument("--max_batches", type=int, default=None, help="limit per task (default: the whole split)")
        parser.add_argument("--batch_size", type=int, default=None)

    try:
        args, bindings = gin_utils.command_line(argv, __doc__.splitlines()[0], add_arguments, distributed=True)
        runtime.configure_malloc()  # before the JAX backend starts its threads
    except (gin_utils.ConfigError, ValueError) as e:
        return gin_utils.fail(e)
    logging.basicConfig(level=logging.WARNING)

    import gin
    import jax

    fail = multihost.fail
    try:
        multihost.initialize(args)
    except multihost.PodError as e:
        return fail(e)
    from peer_jax.training.checkpoint import CheckpointError
    from peer_jax.training.config import TrainConfig

    try:
        gin_utils.parse(args.gin_file, bindings)
        cfg = gin.get_configurable(TrainConfig)()
        tasks = args.tasks.split(",") if args.tasks else list(cfg.eval_tasks)
        multihost.check_workdir(args.checkpoint_dir)
        result = run_eval(cfg, args.checkpoint_dir, tasks, args.step, args.max_batches, args.batch_size)
    except (gin_utils.ConfigError, ValueError, TypeError, FileNotFoundError, CheckpointError,
            multihost.PodError) as e:
        return fail(e)
    except Exception as e:  # noqa: BLE001 - on a pod, often a collective that lost a host
        traceback.print_exc()
        return fail(f"{type(e).__name__}: {e}", status=1, grace_s=args.host_timeout_s + 5)
    if jax.process_index() == 0:  # every host evaluates its share; one writes
        print(format_table(result))
        out = epath.Path(args.checkpoint_dir) / f"eval_step{result['step']}.json"
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return multihost.finish(0)


if __name__ == "__main__":
    from peer_jax import gin_utils

    gin_utils.exit_cli(main())
