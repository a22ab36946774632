#!/usr/bin/env bash
# Deletes the TPU VM slice (and everything on its disks: keep run directories on gs://).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: $0 $COMMON_FLAGS_HELP [--yes]" >&2
  exit 2
}
yes=0
while (($#)); do
  if parse_common_flag "$1"; then shift; continue; fi
  case "$1" in
    --yes) yes=1 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
if [[ "$yes" != 1 && "$DRY_RUN" != 1 ]]; then
  read -r -p "delete TPU VM slice '$TPU_NAME' in $ZONE? [y/N] " answer
  [[ "$answer" == y || "$answer" == Y ]] || { echo "not deleted" >&2; exit 1; }
fi
tpu_vm delete "$TPU_NAME" --quiet
