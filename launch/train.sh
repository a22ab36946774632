#!/usr/bin/env bash
# Runs `python -m peer_jax.train --distributed ARGS` on every worker of the slice and streams
# worker 0's output. Rerunning with the same --workdir resumes from its last checkpoint.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat >&2 <<USAGE
usage: $0 $COMMON_FLAGS_HELP [--run=NAME] [--detach] [--env=NAME=VALUE ...] -- --gin_file=FILE --workdir=gs://BUCKET/DIR [--gin.X=V ...]
  Every worker runs the same command (jax.distributed.initialize() finds the others).
  --workdir must be a gs:// path on a multi-host slice: checkpoints and metrics must be shared.
  --env     NAME=VALUE set in the trainer's environment on every worker (repeatable), e.g.
            --env=LIBTPU_INIT_ARGS=--xla_tpu_offload_gather_to_sparsecore=true
  --run     name of the logs ~/peer_jax_logs/NAME.worker<N>.log (default: the workdir's basename)
  --detach  start in the background on the workers, then follow worker 0's log (Ctrl-C stops
            following, not training; launch/logs.sh follows again, launch/stop.sh stops it)
  Example: $0 -- --gin_file=configs/isoflop/paper/peer_2e19_L16_d1280_h20.gin \\
             --workdir=gs://my-bucket/isoflop/peer_2e19_L16_d1280_h20 \\
             --gin.config.TrainConfig.mesh_shape='(64,1,4)'
USAGE
  exit 2
}
run_name=""
detach=0
while (($#)); do
  if parse_common_flag "$1"; then shift; continue; fi
  case "$1" in
    --run=*) run_name="${1#*=}" ;;
    --detach) detach=1 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1 (trainer arguments go after --)" >&2; usage ;;
  esac
  shift
done
(($#)) || usage
workdir=""
for a in "$@"; do
  case "$a" in --workdir=*) workdir="${a#*=}" ;; esac
done
[[ -n "$workdir" ]] || die "the trainer needs --workdir=gs://... (after --)"
[[ "$workdir" == gs://* ]] || echo "warning: --workdir=$workdir is not on gs://; on a multi-host slice every worker would write its own copy" >&2
run_name="${run_name:-$(basename "$workdir")}"

flags=("${REMOTE_ENV[@]}")
[[ "$detach" == 1 ]] && flags+=(--detach)
cmd="bash launch/remote_run.sh $(quote_args "${flags[@]}" "$run_name" python -m peer_jax.train --distributed "$@")"
on_workers all "$cmd"
if [[ "$detach" == 1 ]]; then
  export TPU_NAME ZONE PROJECT REMOTE_DIR DRY_RUN
  exec "$LAUNCH_DIR/logs.sh" --run="$run_name"
fi
