#!/usr/bin/env bash
# Set up from nothing and run the test suite (CPU; GPU-only tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh .venv test
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python -m pytest -q "$@"
