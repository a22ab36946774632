"""`python -m peer_jax.train --gin_file=configs/runs/tiny_cpu.gin --workdir=DIR [--gin.X=V ...]`.

Trains (or resumes, if DIR holds checkpoints) the configured model. Writes
DIR/operative_config.gin, DIR/metrics.jsonl, DIR/compile_report.json, DIR/tensorboard and
DIR/checkpoints. On a pod every host runs the same command with `--distributed`
(peer_jax/multihost.py). Exit status: 0 done (or preempted after saving), 1 unexpected error,
2 bad configuration, 3 non-finite loss, 4 lost a host (multi-host); on failure the one-line
`error: ...` is the last thing printed. On CPU, glibc's allocator is tuned first
(``$PEER_JAX_MALLOC``, default auto; see peer_jax/runtime.py), and TrainConfig.xla_cpu_pin /
xla_cpu_threads are applied before the JAX backend starts (peer_jax/host.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback

from etils import epath

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    from peer_jax import cli, gin_utils, host, multihost, runtime

    def add_arguments(parser):
        parser.add_argument("--workdir", required=True, help="run directory (resumed if it holds checkpoints)")
        parser.add_argument("--restore_step", type=int, default=None,
                            help="resume from this checkpoint instead of the latest; newer ones are renamed "
                                 "<step>.set_aside (never deleted)")

    try:
        args, bindings = gin_utils.command_line(argv, __doc__.splitlines()[0], add_arguments, distributed=True)
        malloc = runtime.configure_malloc()  # before the JAX backend starts its threads
    except (gin_utils.ConfigError, ValueError) as e:
        return cli.fail(e)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "tensorflow", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import gin
    import jax

    fail = multihost.fail
    try:
        multihost.initialize(args)
    except multihost.PodError as e:
        return fail(e)
    logging.getLogger("peer_jax").info("allocator: %s (PEER_JAX_MALLOC, see peer_jax/runtime.py)", malloc)
    from peer_jax.training import loop
    from peer_jax.training.checkpoint import CheckpointError
    from peer_jax.training.config import TrainConfig

    try:
        gin_utils.parse(args.gin_file, bindings)
        cfg = gin.get_configurable(TrainConfig)()
        gin.finalize()
    except (gin_utils.ConfigError, ValueError, TypeError) as e:
        return fail(e)
    workdir = epath.Path(args.workdir)
    t0 = time.time()
    try:
        multihost.check_workdir(str(workdir))
        workdir.mkdir(parents=True, exist_ok=True)
        result = loop.train(cfg, str(workdir), on_start=lambda: _write_operative_config(workdir),
                            restore_step=args.restore_step)
    except (ValueError, FileNotFoundError, CheckpointError, multihost.PodError) as e:
        return fail(e)
    except loop.NonFiniteLossError as e:
        return fail(e, status=3)
    except Exception as e:  # noqa: BLE001 - on a pod, often a collective that lost a host
        traceback.print_exc()
        return fail(f"{type(e).__name__}: {e}", status=1, grace_s=args.host_timeout_s + 5)
    result["wall_time_s"] = time.time() - t0
    result["host"] = host.describe(cfg.xla_cpu_pin)
    if jax.process_index() == 0:
        (workdir / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    return multihost.finish(0)


def _write_operative_config(workdir: epath.Path) -> None:
    import gin
    import jax

    if jax.process_index() == 0:
        (workdir / "operative_config.gin").write_text(gin.operative_config_str())


if __name__ == "__main__":
    from peer_jax import cli

    cli.exit_cli(main())
