#!/usr/bin/env bash
# Creates the peer environments of the side-by-side benchmarks (issue 16):
#   .side/venv311  Python 3.11, torch CPU + transformers (+ trl if it
#                  installs): scripts/setup_side_env.sh
#   .side/venv312  Python 3.12, google-tunix (pinned), its own jax
# .side/ is git-ignored; Python is found on PATH or through pyenv, never by
# a machine path. Idempotent: a second run only checks the installs. Then
#
#   .venv/bin/python benchmarks/bench_peers.py    # the whole table
#
# Options: --skip-311 / --skip-312 to build one env only.
set -euo pipefail
cd "$(dirname "$0")/.."

TUNIX_VERSION=0.1.7
SKIP311=0
SKIP312=0
for a in "$@"; do
  case "$a" in
    --skip-311) SKIP311=1 ;;
    --skip-312) SKIP312=1 ;;
    *) echo "usage: $0 [--skip-311] [--skip-312]" >&2; exit 2 ;;
  esac
done

find_python312() {
  for c in python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local v; v=$(pyenv versions --bare | grep -E '^3\.12' | tail -1 || true)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0; fi
  fi
  echo "error: Python 3.12 not found (install it, e.g. 'pyenv install 3.12')" >&2
  return 1
}

if [ "$SKIP311" = 0 ]; then
  bash scripts/setup_side_env.sh
fi

if [ "$SKIP312" = 0 ]; then
  SIDE=.side/venv312
  PY=$(find_python312)
  if command -v uv >/dev/null 2>&1 && uv --version >/dev/null 2>&1; then
    [ -x "$SIDE/bin/python" ] || uv venv -q --python "$PY" "$SIDE"
    uv pip install -q --python "$SIDE/bin/python" "google-tunix==$TUNIX_VERSION"
  else
    [ -x "$SIDE/bin/python" ] || "$PY" -m venv "$SIDE"
    "$SIDE/bin/python" -m pip install -q --upgrade pip
    "$SIDE/bin/python" -m pip install -q "google-tunix==$TUNIX_VERSION"
  fi
  echo "Tunix environment ready: $SIDE ($("$SIDE/bin/python" -c 'from importlib import metadata as m; print("google-tunix", m.version("google-tunix"), "jax", m.version("jax"))'))"
fi
