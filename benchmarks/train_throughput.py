"""Training throughput of a named shape: fourbit beside the classic stack (same weights, rows, seed).

Same as `fourbit bench`; the code lives in fourbit.bench (run_steps / run_classic are importable).

    python benchmarks/train_throughput.py --shape tiny --device cpu --seq 64 --bsz 2 --steps 2 --warm 1
    python benchmarks/train_throughput.py --shape llama3-8b --seq 2048 --bsz 4 --runs off,offload,classic \\
        --seed-stack shared/bench/seed_stack.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from fourbit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
