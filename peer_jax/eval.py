"""`python -m peer_jax.eval --gin_file=F --checkpoint_dir=DIR/checkpoints [--tasks=c4,lambada] [--step=N] [--distributed]`.

On a pod every host runs the same command with `--distributed`; each evaluates its block of
every batch, the hosts agree on the number of steps per task, and process 0 writes. Restores
a checkpoint (latest or `--step`) into the run's shardings and reports token-level loss and
perplexity on each eval task over the whole split unless `--max_batches` caps it (padding
never counts; the last partial batch is padded with weight-0 rows): the figures a training
run's final eval logs as `eval/<task>/...` (peer_jax/training/evaluate.py), with `tokens`
read of `split_tokens`, plus expert usage/unevenness for PEER/PKM layers and load spread for
MoE. Prints a table and writes `eval_step<N>.json` next to the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import traceback

from etils import epath

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def restore_run(cfg, checkpoint_dir: str, step: int | None = None):
    """(built, state): the set-up of the run configured by `cfg` (`training.build`) and the train
    state of its checkpoint (latest or `step`), restored into the run's shardings (every host of
    a pod calls it). Used by `peer_jax.eval` and `peer_jax.sample`."""
    from peer_jax import host
    from peer_jax.training import build as build_lib, checkpoint as ckpt

    build_lib.validate(cfg)
    if "://" not in checkpoint_dir and not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"--checkpoint_dir={checkpoint_dir} does not exist; pass the run's "
                                "checkpoints directory (<workdir>/checkpoints).")
    host.pin(cfg)  # the training run's numerics; before the backend starts
    built = build_lib.build(cfg)
    with built.context():
        mngr = ckpt.manager(checkpoint_dir, keep=cfg.keep_checkpoints)
        if mngr.latest_step() is None:
            mngr.close()
            raise FileNotFoundError(f"--checkpoint_dir={checkpoint_dir} holds no checkpoint.")
        with ckpt.close_on_error(mngr):
            state, _ = ckpt.restore(mngr, built.abstract_state, built.shardings, step=step, expect_meta=built.meta())
        mngr.close()
    return built, state


def run_eval(cfg, checkpoint_dir: str, tasks: list[str], step: int | None = None,
             max_batches: int | None = None, batch_size: int | None = None) -> dict:
    """Returns {'step', 'tasks': {task: metrics}} for a checkpoint of a run configured by `cfg`."""
    from peer_jax import multihost
    from peer_jax.training import evaluate as eval_lib

    built, state = restore_run(cfg, checkpoint_dir, step)
    bs = batch_size or built.eval_batch_size
    with built.context():
        shard = multihost.process_row_block(built.batch_sharding, (bs, cfg.seq_len))
        results = {task: eval_lib.evaluate_task(built.eval_step, built.setup, state["params"], state["model_state"],
                                                task, split=cfg.eval_split, seq_len=cfg.seq_len, vocab=built.vocab,
                                                global_rows=bs, shard=shard, max_batches=max_batches,
                                                eval_data_dir=cfg.eval_data_dir)[0]
                   for task in tasks}
    return {"step": int(state["step"]), "tasks": results}


def format_table(result: dict) -> str:
    lines = [f"step {result['step']}",
             f"{'task':<14}{'loss':>9}{'ppl':>11}{'tokens':>12}{'of split':>12}  expert statistics"]
    for task, m in result["tasks"].items():
        extra = ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k not in ("loss", "ppl", "tokens", "split_tokens"))
        size = f"{int(m['split_tokens']):>12d}" if "split_tokens" in m else f"{'?':>12}"
        lines.append(f"{task:<14}{m['loss']:>9.4f}{m['ppl']:>11.3f}{int(m['tokens']):>12d}{size}  {extra}")
    return "\n".join(lines)


def checkpoint_command(argv: list[str] | None, description: str, add_arguments, work, prepare=None):
    """The command-line frame shared by `peer_jax.eval` and `peer_jax.sample`: parses the flags
    (`add_arguments` adds the command's own, `--checkpoint_dir` included) and the gin config,
    joins the pod with `--distributed`, and returns (None, args, work(cfg, args)) from every host,
    or (exit status, None, None) after reporting a failure as one line. `prepare(args)` checks
    the flags before JAX starts."""
    from peer_jax import cli, gin_utils, multihost, runtime

    try:
        args, bindings = gin_utils.command_line(argv, description, add_arguments, distributed=True)
        if prepare is not None:
            prepare(args)
        runtime.configure_malloc()  # before the JAX backend starts its threads
    except (gin_utils.ConfigError, ValueError) as e:
        return cli.fail(e), None, None
    logging.basicConfig(level=logging.WARNING)

    import gin

    fail = multihost.fail
    try:
        multihost.initialize(args)
    except multihost.PodError as e:
        return fail(e), None, None
    from peer_jax.training.checkpoint import CheckpointError
    from peer_jax.training.config import TrainConfig

    try:
        gin_utils.parse(args.gin_file, bindings)
        cfg = gin.get_configurable(TrainConfig)()
        multihost.check_workdir(args.checkpoint_dir)
        return None, args, work(cfg, args)
    except (gin_utils.ConfigError, ValueError, TypeError, FileNotFoundError, CheckpointError,
            multihost.PodError) as e:
        return fail(e), None, None
    except Exception as e:  # noqa: BLE001 - on a pod, often a collective that lost a host
        traceback.print_exc()
        return fail(f"{type(e).__name__}: {e}", status=1, grace_s=args.host_timeout_s + 5), None, None


def main(argv: list[str] | None = None) -> int:
    import jax

    from peer_jax import multihost

    def add_arguments(parser):
        parser.add_argument("--checkpoint_dir", required=True, help="the run's checkpoints directory")
        parser.add_argument("--tasks", default=None,
                            help="comma-separated eval tasks (default: the config's eval_tasks)")
        parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        parser.add_argument("--max_batches", type=int, default=None, help="limit per task (default: the whole split)")
        parser.add_argument("--batch_size", type=int, default=None)

    def work(cfg, args):
        tasks = args.tasks.split(",") if args.tasks else list(cfg.eval_tasks)
        return run_eval(cfg, args.checkpoint_dir, tasks, args.step, args.max_batches, args.batch_size)

    status, args, result = checkpoint_command(argv, __doc__.splitlines()[0], add_arguments, work)
    if status is not None:
        return status
    if jax.process_index() == 0:  # every host evaluates its share; one writes
        print(format_table(result))
        out = epath.Path(args.checkpoint_dir) / f"eval_step{result['step']}.json"
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return multihost.finish(0)


if __name__ == "__main__":
    from peer_jax import cli

    cli.exit_cli(main())
