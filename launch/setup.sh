#!/usr/bin/env bash
# Copies this checkout to every worker of the slice and installs it there (pip install -e .[tpu]).
# Rerun after changing code: files are replaced, the workers' .venv is kept and updated.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install=1
usage() {
  cat >&2 <<USAGE
usage: $0 $COMMON_FLAGS_HELP [--skip_install]
  Copies the git-tracked and untracked-but-not-ignored files of $REPO_ROOT to
  ~/\$REMOTE_DIR on every worker of \$TPU_NAME, then runs launch/remote_setup.sh there
  (a Python >= 3.11 venv with peer_jax installed editable with the 'tpu' extra).
USAGE
  exit 2
}
while (($#)); do
  if parse_common_flag "$1"; then shift; continue; fi
  case "$1" in
    --skip_install) install=0 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done

tgz="$(mktemp -t peer_jax_code.XXXXXX.tgz)"
trap 'rm -f "$tgz"' EXIT
cd "$REPO_ROOT"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Read-only git query: tracked plus untracked-but-not-ignored files that exist, minus local
  # virtual environments and data caches even where .gitignore misses them.
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      case "$f" in .venv*/* | packed/* | runs/* | wandb/*) continue ;; esac
      [[ -f "$f" ]] && printf '%s\0' "$f"
    done |
    tar --null -czf "$tgz" -T -
else
  tar -czf "$tgz" --exclude='./.venv*' --exclude='./runs' --exclude='./wandb' --exclude='*/__pycache__' .
fi
echo "code: $(du -h "$tgz" | cut -f1) -> $TPU_NAME:~/$REMOTE_DIR (all workers)" >&2

tpu_vm scp "$tgz" "$TPU_NAME:peer_jax_code.tgz" --worker=all
remote="set -euo pipefail; d=\"\$HOME/$REMOTE_DIR\"; mkdir -p \"\$d\";"
remote+=" find \"\$d\" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +;"
remote+=" tar -xzf \"\$HOME/peer_jax_code.tgz\" -C \"\$d\" && rm -f \"\$HOME/peer_jax_code.tgz\""
if [[ "$install" == 1 ]]; then
  remote+=" && cd \"\$d\" && bash launch/remote_setup.sh"
fi
tpu_vm ssh "$TPU_NAME" --worker=all --command="bash -c $(printf '%q' "$remote")"
