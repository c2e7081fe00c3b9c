#!/usr/bin/env bash
# Creates the side environment (.side/venv311: Python 3.11, torch CPU,
# transformers, trl) that writes the golden model fixtures and runs the peer
# benchmarks. The test environment (.venv, Python 3.12) never needs torch.
# Idempotent: a second run only checks that everything is installed.
#
#   bash scripts/setup_side_env.sh            # then:
#   .side/venv311/bin/python tests/fixtures/models/make_parity_fixtures.py
#   .venv/bin/python benchmarks/bench_generate.py   # finds .side by default
set -euo pipefail
cd "$(dirname "$0")/.."

find_python311() {
  for c in python3.11 "$HOME/.pyenv/versions/3.11"*/bin/python3.11 \
    /usr/bin/python3.11 /usr/local/bin/python3.11; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  echo "error: Python 3.11 not found (torch CPU wheels are installed for it)" >&2
  return 1
}

SIDE=.side/venv311
PY=$(find_python311)
[ -x "$SIDE/bin/python" ] || "$PY" -m venv "$SIDE"
# pip (not uv): torch 2.13.0 CPU is served from this machine's local wheel.
"$SIDE/bin/python" -m pip install -q --upgrade pip
"$SIDE/bin/python" -m pip install -q "torch==2.13.0" "transformers>=5,<6" \
  "safetensors>=0.6" "numpy>=2.0" "gguf>=0.17" accelerate "peft==0.21.2"
# TRL (peer of the DPO / reward / PPO benchmarks) is optional: a version
# that does not install here leaves the rest of the environment usable.
"$SIDE/bin/python" -m pip install -q "trl==1.16.0" \
  || echo "warning: trl did not install; its benchmark rows are skipped" >&2
echo "side environment ready: $SIDE ($("$SIDE/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
