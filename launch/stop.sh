#!/usr/bin/env bash
# Asks a run to stop: SIGTERM to the pid in ~/peer_jax_logs/RUN.pid on the chosen workers (default
# all). The hosts agree on the step (JAX's preemption sync: a signal to any one worker is enough),
# every worker finishes that step, one checkpoint is written, and all exit 0; train.sh resumes.
#   --worker=W   signal only worker W (e.g. to rehearse a preemption notice that reaches one host)
#   --wait=SECS  then wait up to SECS for the run to end on every worker and print where it stopped
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: $0 $COMMON_FLAGS_HELP --run=NAME [--worker=all|W] [--wait=SECONDS] [--signal=TERM]" >&2
  exit 2
}
run_name=""
sig=TERM
workers=all
wait_s=0
while (($#)); do
  if parse_common_flag "$1"; then shift; continue; fi
  case "$1" in
    --run=*) run_name="${1#*=}" ;;
    --signal=*) sig="${1#*=}" ;;
    --worker=*) workers="${1#*=}" ;;
    --wait=*) wait_s="${1#*=}" ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
[[ -n "$run_name" ]] || usage
[[ "$run_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run must match [A-Za-z0-9._-]+"
[[ "$sig" =~ ^[A-Z0-9]+$ ]] || die "--signal must be a signal name such as TERM or INT"
[[ "$workers" == all || "$workers" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--worker must be 'all' or worker indices such as 0 or 0,3"
[[ "$wait_s" =~ ^[0-9]+$ ]] || die "--wait must be a number of seconds"
pidfile="\$HOME/peer_jax_logs/$run_name.pid"
on_workers "$workers" "if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then kill -$sig \"\$(cat $pidfile)\" && echo \"\$(hostname): sent SIG$sig to \$(cat $pidfile)\"; else echo \"\$(hostname): $run_name is not running\"; fi"
if ((wait_s > 0)); then
  # Each worker waits for its own process, then reports the step its log says it stopped at.
  log="\$HOME/peer_jax_logs/$run_name.worker\${PEER_JAX_WORKER_ID:-*}.log"
  on_workers all "t=0; while [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; do sleep 1; t=\$((t+1)); if [ \$t -ge $wait_s ]; then echo \"\$(hostname): $run_name still running after ${wait_s}s\"; exit 1; fi; done; echo \"\$(hostname): \$(grep -ho 'saved a checkpoint at step [0-9]* and stopped' $log 2>/dev/null | tail -n 1 || true)\""
fi
