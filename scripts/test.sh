#!/usr/bin/env bash
# Sets up ./.venv with the test dependencies and runs the whole suite (8 simulated CPU devices,
# float32 at highest matmul precision; see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" tests "$@"
