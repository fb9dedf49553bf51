#!/usr/bin/env bash
# Sets up ./.venv and runs `rag-jax quickstart` on CPU, offline (about 11 minutes on 2 cores):
# closed-book BART vs RAG-Sequence vs RAG-Token on the embedded synthetic knowledge base.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rag-jax quickstart --out quickstart_out "$@"
