#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (every worker gets the same runtime image).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-256}"
VERSION="${VERSION:-}"
extra=()
usage() {
  cat >&2 <<USAGE
usage: $0 $COMMON_FLAGS_HELP
          [--accelerator_type=v5litepod-256] [--version=RUNTIME] [--spot] [-- EXTRA_GCLOUD_FLAGS...]
  Creates TPU VM slice \$TPU_NAME. --version defaults by accelerator type (v4: tpu-ubuntu2204-base,
  v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).
  Examples: $0 --accelerator_type=v4-128 --zone=us-central2-b
            $0 --accelerator_type=v5litepod-256 --zone=us-west4-a --spot
USAGE
  exit 2
}
while (($#)); do
  if parse_common_flag "$1"; then shift; continue; fi
  case "$1" in
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) extra+=(--spot) ;;
    --) shift; extra+=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
VERSION="${VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"

echo "creating $TPU_NAME: $ACCELERATOR_TYPE, runtime $VERSION, zone $ZONE" >&2
tpu_vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${extra[@]}"
tpu_vm describe "$TPU_NAME" --format="value(state,acceleratorType,networkEndpoints.len())"
