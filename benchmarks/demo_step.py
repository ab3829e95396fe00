"""Seconds per training step of the demo-circles preset, and what two of its speed choices are worth.

Variants, each a trainer built once, timed with interleaved repetitions (median of the rounds' means):

- ``preset``: the preset as shipped (16-channel full-resolution VAE, plain attention on the CPU, bf16 autocast);
- ``fused-attention``: the same with PyTorch's fused attention (diffusers' ``AttnProcessor2_0``, transformers'
  ``sdpa``), which ``PairedTrainer`` replaces on the CPU (``use_math_attention``);
- ``vae-32``: the same with the earlier 32-channel full-resolution VAE (``block_out_channels`` [32, 32, 64, 64]).

Usage (from a checkout, ``PYTHONPATH=src`` unless the package is installed)::

    turbo-i2i data circles --out /tmp/circles --n 6000 --seed 1 --size 64
    python benchmarks/demo_step.py --data /tmp/circles --rounds 3 --steps 4

Prints one line per variant: median seconds per step and the ratio to ``preset``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time


def build(name: str, data: str):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from turbo_i2i import backbone
    from turbo_i2i.training.options import PRESETS
    from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer

    saved = copy.deepcopy(backbone.BUILTIN_BACKBONES["tiny-circles"])
    if name == "vae-32":
        spec = backbone.BUILTIN_BACKBONES["tiny-circles"]
        spec["vae"] = {**spec["vae"], "block_out_channels": [32, 32, 64, 64]}
    options = {k: v for k, v in PRESETS["demo-circles"].items() if k != "extra"}
    options.update(
        dataset=data, output_dir=tempfile.mkdtemp(prefix=f"demo-step-{name}-"), report_to="none", eval_every=10**9,
        checkpoint_every=10**9,
    )  # fmt: skip
    try:
        trainer = PairedTrainer(PairedTrainConfig(**options))
    finally:
        backbone.BUILTIN_BACKBONES["tiny-circles"] = saved
    if name == "fused-attention":
        trainer.text_encoder.set_attn_implementation("sdpa")
        for module in trainer.generator.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor2_0())
    for _ in range(2):  # warm-up: oneDNN picks its kernels on the first calls
        trainer.train_step()
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a circles data set (turbo-i2i data circles)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    args = parser.parse_args(argv)

    names = ("preset", "fused-attention", "vae-32")
    trainers = {name: build(name, args.data) for name in names}
    means: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            start = time.perf_counter()
            for _ in range(args.steps):
                trainers[name].train_step()
            means[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(means["preset"])
    for name in names:
        seconds = statistics.median(means[name])
        print(f"{name:16s} {seconds:.3f} s/step  {seconds / base:.2f}x of preset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
