#!/usr/bin/env bash
# Runs or resumes an isoFLOP sweep on the slice: one training run per grid point, one after
# another, each on every worker. The points and their commands come from
# `scripts/isoflop_sweep.py GRID --root ROOT --print_commands`; a point whose ROOT/NAME/result.json
# reports its final step and an eval loss is skipped, an interrupted one resumes from its
# checkpoints (the trainer does that), so rerunning this script continues where it stopped.
# Post-hoc evals (--eval_tasks after --) run on every worker with --distributed. Exit status: 0 all
# done, 1 a point failed, 3 a point stopped early (preempted or stop.sh): rerun to resume.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat >&2 <<USAGE
usage: $0 $COMMON_FLAGS_HELP GRID --root=gs://BUCKET/DIR
          [--methods=dense,peer] [--budgets=2e19] [--only=REGEX] [--keep_going] [--list] [--env=NAME=VALUE ...]
          [-- EXTRA_ARGS_FOR_isoflop_sweep.py e.g. --gin.config.TrainConfig.mesh_shape='(64,1,4)']
  GRID: configs/isoflop/paper (or mini, or a grid.json). Points run in the order of grid.json.
  --keep_going  continue with the next point when one fails (default: stop)
  --list        print each point with its state (done / todo) and run nothing
  --env         NAME=VALUE set in every run's environment on every worker (repeatable)
USAGE
  exit 2
}
grid=""
root=""
keep_going=0
list=0
filters=()
extra=()
while (($#)); do
  if parse_common_flag "$1"; then shift; continue; fi
  case "$1" in
    --root=*) root="${1#*=}" ;;
    --methods=* | --budgets=* | --only=*) filters+=("${1%%=*}" "${1#*=}") ;;
    --keep_going) keep_going=1 ;;
    --list) list=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    -*) echo "unknown argument: $1" >&2; usage ;;
    *) [[ -z "$grid" ]] || usage; grid="$1" ;;
  esac
  shift
done
[[ -n "$grid" && -n "$root" ]] || usage
[[ "$root" == gs://* ]] || echo "warning: --root=$root is not on gs://; workers of a multi-host slice do not share it" >&2

python_bin="$REPO_ROOT/.venv/bin/python"
[[ -x "$python_bin" ]] || python_bin=python3
commands="$("$python_bin" "$REPO_ROOT/scripts/isoflop_sweep.py" "$grid" --root "$root" --print_commands \
  "${filters[@]}" "${extra[@]}")"

# Reads a file under ROOT (gs:// or local) to stdout; fails if it is absent.
read_root_file() {
  if [[ "$root" == gs://* ]]; then
    [[ "$DRY_RUN" == 1 ]] && return 1
    gcloud storage cat "$root/$1" 2>/dev/null
  else
    cat "$root/$1" 2>/dev/null
  fi
}

# ROOT/NAME/result.json at step >= STEPS with an eval loss: the training run is finished.
train_done() {
  local json
  json="$(read_root_file "$1/result.json")" || return 1
  "$python_bin" -c 'import json, sys
r = json.loads(sys.argv[1])
sys.exit(0 if int(r.get("step", -1)) >= int(sys.argv[2]) and "eval_loss" in r else 1)' "$json" "$2"
}

# Runs one command of a point on every worker; returns its status.
run_on_workers() {
  local run="$1" cmd="$2"
  echo "run    $run: $cmd" >&2
  on_workers all "bash launch/remote_run.sh $(quote_args "${REMOTE_ENV[@]}" "$run" bash -c "$cmd")"
}

# The printed commands: "# NAME: STEPS steps, ..." then the train command, then (with
# --eval_tasks) a `python -m peer_jax.eval` command for the final checkpoint.
names=() steps=() trains=() evals=()
while IFS= read -r line; do
  if [[ "$line" =~ ^#\ ([A-Za-z0-9._-]+):\ ([0-9]+)\ steps ]]; then
    names+=("${BASH_REMATCH[1]}") steps+=("${BASH_REMATCH[2]}") trains+=("") evals+=("")
  elif [[ -n "$line" && "$line" != \#* && ${#names[@]} -gt 0 ]]; then
    i=$((${#names[@]} - 1))
    if [[ -z "${trains[$i]}" ]]; then trains[i]="$line"; else evals[i]="$line"; fi
  fi
done <<<"$commands"

n_skip=0 n_run=0 failed=()
for i in "${!names[@]}"; do
  name="${names[$i]}" n="${steps[$i]}"
  todo=()
  train_done "$name" "$n" || todo+=(train)
  if [[ -n "${evals[$i]}" ]] && ! read_root_file "$name/checkpoints/eval_step$n.json" >/dev/null; then
    todo+=(eval)
  fi
  if ((${#todo[@]} == 0)); then
    echo "done   $name" >&2
    n_skip=$((n_skip + 1))
    continue
  fi
  if [[ "$list" == 1 ]]; then
    echo "todo   $name ($n steps): ${todo[*]}" >&2
    continue
  fi
  n_run=$((n_run + 1))
  ok=1
  if [[ " ${todo[*]} " == *" train "* ]]; then
    status=0
    run_on_workers "$name" "${trains[$i]}" || status=$?
    if ((status != 0)); then
      ok=0
      ((status == 4)) && echo "lost a host during $name (exit 4): the workers' logs name it" >&2
    elif ! train_done "$name" "$n"; then
      # Exit 0 before the last step: the hosts agreed to stop (SIGTERM: preemption, maintenance or
      # stop.sh) and saved a checkpoint. The slice is going away: stop here, and resume later.
      echo "stopped $name before its last step (preempted or stopped); rerun this command to resume" >&2
      echo "sweep: ${#names[@]} points, $n_skip already done, interrupted at $name" >&2
      exit 3
    fi
  fi
  if [[ "$ok" == 1 && " ${todo[*]} " == *" eval "* ]]; then
    run_on_workers "$name.eval" "${evals[$i]}" || ok=0
  fi
  if [[ "$ok" == 0 ]]; then
    failed+=("$name")
    echo "FAILED $name (logs: launch/logs.sh --run=$name)" >&2
    [[ "$keep_going" == 1 ]] || break
  fi
done
echo "sweep: ${#names[@]} points, $n_skip already done, $n_run run now, ${#failed[@]} failed${failed[*]:+: ${failed[*]}}" >&2
((${#failed[@]} == 0))
