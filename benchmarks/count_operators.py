"""ATen operator calls of one unpaired training iteration, by operator: what the host dispatches (and, on a GPU,
roughly what it launches), independent of how fast this machine is.

Full-size architecture with random weights, the unpaired benchmark's cases (``benchmarks/train_unpaired.py``), the
generator in NCHW memory as the trainers keep it on GPUs; two iterations run first (the first creates the optimiser
states), the third is counted with a ``TorchDispatchMode`` (top-level calls only: an operator's inner calls are not
counted, unlike ``train_unpaired.py --profile``). On the CPU, AdamW and gradient clipping run per tensor where CUDA
runs them as foreach kernels: their calls count here, not there.

Usage (from a checkout, ``PYTHONPATH=src`` unless the package is installed)::

    python benchmarks/count_operators.py --case ours-bf16 --size 64
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_unpaired  # noqa: E402  (the benchmark's cases and trainer set-up)


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> int:
    from turbo_i2i.benchmark import default_reference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted(train_unpaired.CASES), default="ours-bf16")
    p.add_argument("--size", type=int, default=64, help="image side: the count does not depend on it")
    p.add_argument("--config", choices=("full", "tiny"), default="full")
    p.add_argument("--reference", type=Path, default=default_reference(Path(__file__).resolve().parents[1]))
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    with train_unpaired.case_trainer(args.case, args.size, "cpu", args.config, args.reference) as trainer:
        if not args.case.endswith("-nhwc"):
            trainer.generator.to(memory_format=torch.contiguous_format)  # NCHW, as the trainers keep it on GPUs
        trainer.train_step()  # creates the optimiser states
        trainer.train_step()
        with OperatorCounter() as counter:
            trainer.train_step()
    total = sum(counter.calls.values())
    print(json.dumps(dict(case=args.case, size=args.size, config=args.config, total=total,
                          top=counter.calls.most_common(args.top))))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
