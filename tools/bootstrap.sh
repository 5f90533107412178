#!/usr/bin/env bash
# One entry point for a fresh machine: create .venv (Python 3.12) with the project installed,
# then run the main job or the tests.
#   bash tools/bootstrap.sh demo    # tiny MoE training on CPU with the probe on, ends in a report
#   bash tools/bootstrap.sh test    # the test suite (what .ci/run runs)
# Any further arguments are passed to the job (e.g. `test -k stats`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${MOE_PROBE_VENV:-$ROOT/.venv}

find_python312() {
  local c
  # PATH first; a pyenv shim for a version that is not activated fails --version, so test it.
  for c in python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for c in "$root"/versions/3.12.*/bin/python3.12; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

setup() {
  local stamp="$VENV/.moe_probe_stamp" want
  want=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  local py
  if ! py=$(find_python312); then
    echo "error: Python 3.12 not found (megatron-core >= 0.17 ships cp312 wheels only)." >&2
    echo "       Put python3.12 on PATH or install it with pyenv (pyenv install 3.12)." >&2
    exit 1
  fi
  echo "[bootstrap] creating $VENV with $py (first run: ~2 minutes, torch is large)" >&2
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
}

mode=${1:-}
[ $# -gt 0 ] && shift
case "$mode" in
  demo) setup; exec "$VENV/bin/moe-probe" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  setup) setup ;;
  *) echo "usage: bash tools/bootstrap.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
