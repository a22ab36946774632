# shellcheck shell=bash
# Sourced by the launch scripts: settings (environment variables, overridable by flags), flag
# parsing and gcloud wrappers. Not meant to be run on its own.
#
#   TPU_NAME     TPU VM slice name                          (default peer-jax)
#   ZONE         GCE zone                                   (default us-west4-a: has v5e)
#   PROJECT      GCP project; empty = gcloud's default
#   REMOTE_DIR   checkout on each worker, relative to $HOME (default peer_jax)
#   DRY_RUN=1    print the gcloud commands instead of running them

TPU_NAME="${TPU_NAME:-peer-jax}"
ZONE="${ZONE:-us-west4-a}"
PROJECT="${PROJECT:-}"
REMOTE_DIR="${REMOTE_DIR:-peer_jax}"
DRY_RUN="${DRY_RUN:-0}"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
# shellcheck disable=SC2034
COMMON_FLAGS_HELP="[--name=TPU_NAME] [--zone=ZONE] [--project=PROJECT] [--remote_dir=DIR] [--dry_run]"
# --env=NAME=VALUE (train.sh, sweep.sh; repeatable): set in the training processes' environment
# on every worker, e.g. --env=LIBTPU_INIT_ARGS=--xla_tpu_offload_gather_to_sparsecore=true
REMOTE_ENV=()

# Consumes one of the flags every script takes; returns 1 if "$1" is not one of them.
parse_common_flag() {
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --env=*)
      [[ "${1#--env=}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes NAME=VALUE, got '$1'"
      REMOTE_ENV+=("$1") ;;
    *) return 1 ;;
  esac
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Runs (or with DRY_RUN=1 prints) a command.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# gcloud compute tpus tpu-vm SUBCOMMAND ... with the zone and project.
tpu_vm() {
  local sub="$1"
  shift
  local extra=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && extra+=(--project="$PROJECT")
  run gcloud compute tpus tpu-vm "$sub" "$@" "${extra[@]}"
}

# Runs a shell command on every worker of the slice (concurrently), in the checkout.
on_workers() {
  local workers="$1" cmd="$2"
  tpu_vm ssh "$TPU_NAME" --worker="$workers" --command="cd \"\$HOME/$REMOTE_DIR\" && $cmd"
}

# Quotes arguments for a remote shell.
quote_args() {
  local out="" a
  for a in "$@"; do
    out+=" $(printf '%q' "$a")"
  done
  printf '%s' "${out# }"
}

# The TPU software (runtime) version that goes with an accelerator type.
default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default --version for accelerator type '$1'; pass --version=RUNTIME_VERSION" ;;
  esac
}
