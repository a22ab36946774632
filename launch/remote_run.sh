#!/usr/bin/env bash
# Runs one command on this TPU worker, inside the checkout (train.sh and sweep.sh call it on
# every worker through `gcloud ... ssh --worker=all`). The full output of every worker goes to
# ~/peer_jax_logs/RUN.worker<N>.log; worker 0 also prints it, so the caller streams one copy.
# The command's pid is kept in ~/peer_jax_logs/RUN.pid (launch/stop.sh signals it).
#   --detach          start it with nohup/setsid and return at once (survives the SSH session)
#   --env=NAME=VALUE  export NAME=VALUE for the command (repeatable; train.sh/sweep.sh --env)
set -euo pipefail

usage() {
  echo "usage: $0 [--detach] [--env=NAME=VALUE ...] RUN_NAME COMMAND [ARGS...]   (on a TPU worker, in the checkout)" >&2
  exit 2
}
detach=0
env_set=()
while (($#)); do
  case "$1" in
    --detach) detach=1 ;;
    --env=*)
      kv="${1#--env=}"
      [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "error: --env takes NAME=VALUE, got '$1'" >&2; exit 2; }
      env_set+=("$kv") ;;
    *) break ;;
  esac
  shift
done
(($# >= 2)) || usage
run="$1"
shift
[[ "$run" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "error: RUN_NAME '$run' must match [A-Za-z0-9._-]+" >&2; exit 2; }
[[ -x .venv/bin/python ]] || { echo "error: no .venv here ($PWD); run launch/setup.sh first" >&2; exit 2; }

logdir="$HOME/peer_jax_logs"
mkdir -p "$logdir"
# The worker's index in the slice, from the TPU VM metadata (0 on a single-host slice);
# PEER_JAX_WORKER_ID overrides it (launch/sim/gcloud, the local simulation, sets it).
worker="${PEER_JAX_WORKER_ID:-$(curl -fsS -m 5 -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || echo 0)}"
log="$logdir/$run.worker$worker.log"

# shellcheck source=/dev/null
source .venv/bin/activate
export WANDB_MODE="${WANDB_MODE:-disabled}" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
for kv in "${env_set[@]}"; do
  export "${kv%%=*}=${kv#*=}"
  printf '%s worker %s: env %s\n' "$(date -Is)" "$worker" "$kv" >>"$log"
done
printf '%s worker %s: %s\n' "$(date -Is)" "$worker" "$*" >>"$log"

if [[ "$detach" == 1 ]]; then
  nohup setsid "$@" >>"$log" 2>&1 </dev/null &
  echo "$!" >"$logdir/$run.pid"
  echo "worker $worker: started pid $! (log $log)"
  exit 0
fi
echo "$$" >"$logdir/$run.pid"  # exec keeps the pid
if [[ "$worker" == 0 ]]; then
  exec "$@" > >(tee -a "$log") 2>&1
else
  exec "$@" >>"$log" 2>&1
fi
