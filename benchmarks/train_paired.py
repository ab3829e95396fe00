"""Seconds per step and peak memory of paired (pix2pix-Turbo) training, full-size architecture, random weights.

The paper's whole objective (L2 + 5 LPIPS-VGG + 5 CLIP-sim + 0.5 GAN with the vision-aided CLIP ViT-B/32
discriminator), with the edge model's adapters (UNet LoRA rank 8, VAE LoRA rank 4, skip convs, conv_in), batch 1.
LPIPS's VGG16 trunk and CLIP ViT-B/32 are randomly initialised (same cost as the pretrained ones, no download).
Cases, each in a fresh subprocess (so one case's memory never counts towards another's):

- ``fp32``: everything in fp32;
- ``fp32-ckpt``: fp32 with gradient checkpointing of the UNet and VAE blocks;
- ``bf16``: bf16 autocast, frozen weights stored in bf16, trainable weights and Adam state fp32;
- ``bf16-ckpt``: bf16 with gradient checkpointing.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the measured steps (weights, optimiser states, activations);
on the CPU the peak resident set size sampled while the steps run.

Usage (from the repository root)::

    python benchmarks/train_paired.py --sizes 512 --out benchmarks/results/train-paired-h100     # GPU if present
    python benchmarks/train_paired.py --config tiny --sizes 64 --out /tmp/tiny                  # smoke test

Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

CASES = {
    "fp32": dict(mixed_precision="no", gradient_checkpointing=False),
    "fp32-ckpt": dict(mixed_precision="no", gradient_checkpointing=True),
    "bf16": dict(mixed_precision="bf16", gradient_checkpointing=False),
    "bf16-ckpt": dict(mixed_precision="bf16", gradient_checkpointing=True),
}


def _write_pairs(root: Path, size: int) -> None:
    rng = torch.Generator().manual_seed(0)
    prompts = {}
    for i in range(2):
        for split in ("train_A", "train_B"):
            (root / split).mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (size, size, 3), generator=rng, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / split / f"{i}.png")
        prompts[f"{i}.png"] = "a photo of a red car on a mountain road"
    (root / "train_prompts.json").write_text(json.dumps(prompts))


def run_case(
    case: str, size: int, device: str, config: str, reference: Path, steps: int, warmup: int, profile: bool = False
) -> dict:
    """Build a paired trainer for one case and time its steps.

    Args:
        case: a key of ``CASES``.
        size: image side in pixels.
        device: torch device.
        config: "full" (SD-Turbo's architecture from ``reference``) or "tiny" (the built-in tiny backbone).
        reference: the SD-Turbo config folder.
        steps: timed steps (the median is reported).
        warmup: untimed steps first (the first allocates the optimiser states; its memory counts).
        profile: also profile one more step (``turbo_i2i.benchmark_harness.profile_step``, through ``measure_steps``),
        after the timed ones.

    Returns:
        the measurement.
    """
    from accelerate import Accelerator

    from turbo_i2i.backbone import load_backbone
    from turbo_i2i.benchmark import random_backbone
    from turbo_i2i.benchmark_harness import measure_steps
    from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer
    from turbo_i2i.training.pretrained import load_clip, load_lpips, tiny_clip, tiny_lpips

    dev = torch.device(device)
    tiny = config == "tiny"
    networks = (tiny_lpips(), tiny_clip()) if tiny else (load_lpips(pretrained=False), load_clip(pretrained=None))
    with tempfile.TemporaryDirectory() as tmp:
        _write_pairs(Path(tmp) / "data", size)
        options = dict(
            dataset=str(Path(tmp) / "data"), output_dir=str(Path(tmp) / "run"), base_model=f"{config} (random)",
            transform="no_resize", batch_size=1, max_steps=10**6, lr_warmup_steps=0, disc="clip",
            checkpoint_every=10**9, eval_every=10**9, **CASES[case],
        )  # fmt: skip
        trainer = PairedTrainer(
            PairedTrainConfig(**options),
            accelerator=Accelerator(cpu=dev.type == "cpu"),
            loss_networks=networks,
            backbone=load_backbone("tiny") if tiny else random_backbone(reference, device=dev),
        )
        trained = sum(p.numel() for p in trainer.unwrapped.parameters() if p.requires_grad)

        measured = measure_steps(trainer.train_step, dev, warmup, steps, profile)
    return dict(
        case=case, size=size, device=str(dev), config=config, **CASES[case], trained_parameters=trained,
        seconds_per_step=statistics.median(measured["seconds"]), **measured,
    )  # fmt: skip


def markdown(report: dict) -> str:
    """The results as a markdown table with ratios to fp32 at the same size."""
    from turbo_i2i.benchmark_harness import rounds_note, seconds_cell

    lines = [
        f"Paired training step, {report['config']} architecture with random weights, batch 1, on {report['machine']};"
        f" memory: {report['memory']}. Loss: L2 + LPIPS + CLIP-sim + GAN (vision-aided CLIP D). Median of"
        f" {report['steps']} steps after {report['warmup']} warm-up.{rounds_note(report)}",
        "",
        "| size | case | s / step | peak memory (GiB) | memory vs fp32 | time vs fp32 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    fp32 = {r["size"]: r for r in report["results"] if r["case"] == "fp32" and "error" not in r}
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['case']} | | {r['error']} | | |")
            continue
        base = fp32.get(r["size"])
        mem = f"{r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x" if base else ""
        sec = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}x" if base else ""
        lines.append(
            f"| {r['size']} | {r['case']} | {seconds_cell(r, 'seconds_per_step')} | {r['peak_memory_gib']:.2f} |"
            f" {mem} | {sec} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from turbo_i2i.benchmark import machine_description, write_report
    from turbo_i2i.benchmark_harness import profile_markdown, run_training_cases, training_benchmark_arguments

    args = training_benchmark_arguments(argv, __doc__.splitlines()[0], list(CASES), list(CASES), [512])
    if args.worker:  # one case, in this (fresh) process: its measurement as one JSON line
        print(json.dumps(run_case(args.cases[0], args.sizes[0], args.device, args.config, args.reference,
                                  args.steps, args.warmup, args.profile)))  # fmt: skip
        return 0

    def write(results: list[dict], show: bool = False) -> None:
        report = dict(
            machine=machine_description(torch.device(args.device)), config=args.config, steps=args.steps,
            warmup=args.warmup, rounds=args.rounds, results=results,
            memory="torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (sampled)",
        )  # fmt: skip
        write_report(args.out, report, markdown(report) + profile_markdown(results), show)

    # the report is rewritten after every case: a run stopped from outside still leaves the finished ones
    write(run_training_cases(__file__, args, "seconds_per_step", on_result=write), show=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
