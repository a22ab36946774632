#!/usr/bin/env bash
# Follows the log of a run on one worker (default worker 0). Ctrl-C stops following only.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: $0 $COMMON_FLAGS_HELP --run=NAME [--worker=0] [--lines=200]" >&2
  exit 2
}
run_name=""
worker=0
lines=200
while (($#)); do
  if parse_common_flag "$1"; then shift; continue; fi
  case "$1" in
    --run=*) run_name="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --lines=*) lines="${1#*=}" ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
[[ -n "$run_name" ]] || usage
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be one worker index"
on_workers "$worker" "tail -n $lines -F \"\$HOME/peer_jax_logs/$run_name.worker$worker.log\""
