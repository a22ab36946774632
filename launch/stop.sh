#!/usr/bin/env bash
# Asks a run to stop on every worker: SIGTERM to the pid in ~/peer_jax_logs/RUN.pid. The
# trainer finishes its step, saves a checkpoint and exits 0; rerun train.sh to resume.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: $0 $COMMON_FLAGS_HELP --run=NAME [--signal=TERM]" >&2
  exit 2
}
run_name=""
sig=TERM
while (($#)); do
  if parse_common_flag "$1"; then shift; continue; fi
  case "$1" in
    --run=*) run_name="${1#*=}" ;;
    --signal=*) sig="${1#*=}" ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
[[ -n "$run_name" ]] || usage
[[ "$sig" =~ ^[A-Z0-9]+$ ]] || die "--signal must be a signal name such as TERM or INT"
pidfile="\$HOME/peer_jax_logs/$run_name.pid"
on_workers all "if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then kill -$sig \"\$(cat $pidfile)\" && echo \"\$(hostname): sent SIG$sig to \$(cat $pidfile)\"; else echo \"\$(hostname): $run_name is not running\"; fi"
