#!/usr/bin/env bash
# Runs on each TPU worker, in the checkout (launch/setup.sh calls it): creates .venv with
# Python >= 3.11 and installs peer_jax editable with the 'tpu' extra (jax[tpu] -> libtpu),
# pinned by constraints.txt. TPU VM images (Ubuntu 22.04) ship Python 3.10, so a 3.11
# interpreter comes from uv (a single binary; pip install --user uv) unless one is present.
set -euo pipefail

usage() {
  echo "usage: $0   (run inside the checkout on a TPU worker)" >&2
  exit 2
}
(($# == 0)) || usage
[[ -f pyproject.toml ]] || { echo "error: run inside the peer_jax checkout" >&2; exit 2; }

py=""
for cand in python3.13 python3.12 python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py="$cand"
    break
  fi
done

if [[ -n "$py" ]] && "$py" -m venv --help >/dev/null 2>&1; then
  [[ -x .venv/bin/python ]] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q -U pip
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[tpu]'
else
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null || python3 -m pip install -q --user uv
  [[ -x .venv/bin/python ]] || uv venv -q --python 3.11 .venv
  uv pip install -q --python .venv/bin/python -c constraints.txt -e '.[tpu]'
fi
.venv/bin/python - <<'PY'
import importlib.metadata as md, socket
print(f"{socket.gethostname()}: jax {md.version('jax')}, libtpu {md.version('libtpu')}, peer_jax {md.version('peer_jax')}")
PY
