#!/usr/bin/env bash
# Set up (with TRL, verl and test tools), lint, and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check --quiet . && .venv/bin/ruff format --check --quiet . \
  || { echo "lint failed: run .venv/bin/ruff check --fix . && .venv/bin/ruff format ." >&2; exit 1; }
exec .venv/bin/python -m pytest "$@"
