#!/usr/bin/env bash
# Creates .venv-tpu: the project's .venv plus libtpu, for compiling against TPU topologies on a
# CPU host (scripts/aot_compile.py, tests/test_aot.py). It adds only libtpu (~700 MB) and reads
# everything else from .venv through a .pth file, so the two never drift apart; .venv itself is
# left without libtpu (with libtpu, every plain CPU run with JAX_PLATFORMS unset prints libtpu
# start-up errors, see launch/README.md).
set -euo pipefail

usage() {
  echo "usage: $0 [--base_venv=.venv] [--venv=.venv-tpu] [--python=python3]" >&2
  exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="$repo/.venv"
venv="$repo/.venv-tpu"
python_bin=""
for arg in "$@"; do
  case "$arg" in
    --base_venv=*) base="$(realpath -m "${arg#*=}")" ;;
    --venv=*) venv="$(realpath -m "${arg#*=}")" ;;
    --python=*) python_bin="${arg#*=}" ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $arg" >&2; usage ;;
  esac
done

if [[ ! -x "$base/bin/python" ]]; then
  echo "error: $base/bin/python not found; create the project venv first (make test, or make train)." >&2
  exit 1
fi
# The base venv's interpreter (same version, so its site-packages are importable).
python_bin="${python_bin:-$("$base/bin/python" -c 'import sys; print(sys._base_executable)')}"
base_site="$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
jax_version="$("$base/bin/python" -c 'import jax; print(jax.__version__)')"

if [[ ! -x "$venv/bin/python" ]]; then
  "$python_bin" -m venv "$venv"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# An `import` line in a .pth file runs at start-up: addsitedir also processes the base venv's
# own .pth files (the editable install of peer_jax).
echo "import site; site.addsitedir('$base_site')" > "$site/zz_base_venv.pth"
# jax[tpu]==<jax version> pins the matching libtpu; jax itself is already satisfied from .venv.
"$venv/bin/python" -m pip install -q "jax[tpu]==$jax_version"
"$venv/bin/python" - <<'PY'
import importlib.util, jax, peer_jax
assert importlib.util.find_spec("libtpu") is not None, "libtpu did not install"
print(f"ok: jax {jax.__version__}, libtpu at {importlib.util.find_spec('libtpu').origin}, peer_jax at {peer_jax.__file__}")
PY
echo "Run: $venv/bin/python scripts/aot_compile.py --gin_file=... --topology=v5e:16x16"
