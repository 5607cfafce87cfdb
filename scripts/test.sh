#!/usr/bin/env bash
# Set up (with TRL, verl and test tools), lint, and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check --quiet . && .venv/bin/ruff format --check --quiet . \
  || { echo "lint failed: run .venv/bin/ruff check --fix . && .venv/bin/ruff format ." >&2; exit 1; }
# Test files run in parallel, a whole file per worker (module fixtures built once): one worker per usable
# core, at most 4 (a real-model file holds ~5 GB). Extra args come after, so `-n 0` runs them in one process.
workers=$(.venv/bin/python -c 'import os; print(min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4))')
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
