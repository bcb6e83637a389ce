#!/bin/bash
# One device call on the H200: install the carried stack, GPU tests, then the benchmark table.
# Usage (repo root, on the GPU machine): bash benchmarks/h200_call.sh "<bench args>"
set -o pipefail
bash .carry/stack/install.sh >/dev/null 2>&1 || echo "install failed"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, triton, bitsandbytes, peft; print(torch.__version__, transformers.__version__, triton.__version__, bitsandbytes.__version__, peft.__version__)"
python3 -m pytest -q -x tests/test_lora_fn.py tests/test_activations.py tests/test_kernels_fused.py \
    tests/test_kernels_lm_loss.py tests/test_kernels_rope.py tests/test_optim.py 2>&1 | tail -4 | tee $OUT/pytest.txt
python3 benchmarks/train_throughput.py $1 --json $OUT/results.json 2>&1 | grep -v -i "warn" | tee $OUT/bench.log
