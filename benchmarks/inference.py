"""Inference speed and memory, baseline vs fast path, full-size SD-Turbo architecture with random weights.

Same as ``turbo-i2i bench``; run from the repository root, e.g.

    python benchmarks/inference.py --sizes 256 512 --batches 1 --out benchmarks/results/inference-cpu
    python benchmarks/inference.py --device cuda --compile --batches 1 8 --out benchmarks/results/inference-h200

Writes OUT.json (every number) and OUT.md (the table in the README).
"""

import sys

from turbo_i2i.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
