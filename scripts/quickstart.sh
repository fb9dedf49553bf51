#!/usr/bin/env bash
# Sets up ./.venv and runs the end-to-end example on CPU, offline (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python experiments/tiny_rag_demo.py "$@"
