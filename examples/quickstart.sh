#!/usr/bin/env bash
# The quickstart: set up from nothing, fine-tune SmolLM2-135M on the bundled dataset, show before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh .venv
python examples/quickstart.py "$@"
