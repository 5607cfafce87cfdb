#!/usr/bin/env bash
# Create ./.venv and install mhpo into it. Idempotent: a second run only checks what is there.
#   scripts/setup.sh            the trainer (mhpo[train])
#   scripts/setup.sh --dev      also TRL, verl and the test tools (mhpo[train,trl,verl,test])
# torch is installed first and on its own: asked for by another package, pip would pick the newest
# (CUDA) build. Versions are pinned in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="train"
[ "${1:-}" = "--dev" ] && extras="train,trl,verl,test"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c constraints.txt torch 2>&1 | { grep -v "^WARNING: Location" || true; }
"${pip[@]}" install -c constraints.txt -e ".[$extras]" 2>&1 | { grep -v "^WARNING: Location" || true; }
