"""Seconds per iteration and peak memory of unpaired (CycleGAN-Turbo) training, full-size architecture, random weights.

The cases, each in a fresh subprocess (so one case's memory never counts towards another's, and peak RSS,
which only grows within a process, is the case's own on the CPU):

- ``public``: the public implementation's schedule: three generator steps per iteration (cycle, GAN, identity),
  translations recomputed: eight generator passes; fp32 everywhere; no gradient checkpointing; upsamplers that
  convolve the doubled image (its one frozen VAE is shared by both directions here, where the public code deep-copies
  it: 0.3 GiB more there, not counted);
- ``ours-fp32``: the joint objective: one generator step, each translation computed once: six passes; sub-pixel
  upsampling in the VAE decoders (the same function with 4/9 of the multiply-adds, ``turbo_i2i.subpixel``); fp32;
- ``ours-bf16-ckpt``: the joint objective under bf16 autocast with fp32 trainable weights and the frozen backbone
  stored in bf16 (channels-last memory on the CPU), gradient checkpointing of the UNet and VAE blocks;
- ``ours-bf16``, ``ours-bf16-nhwc``, ``ours-bf16-plain``, ``ours-bf16-compile``, ``ours-fp32-compile``,
  ``ours-fp16`` and ``ours-bf16-ckpt-8bit`` (only when named in ``--cases``): bf16 without checkpointing (what
  checkpointing costs and saves); the same with the generator in channels-last memory where the trainer does not
  choose it (``training.compute.channels_last_in_training``: on GPUs); the same with the VAE decoders' upsamplers as
  defined (what sub-pixel upsampling saves); bf16 and fp32 with ``compile`` (the UNet and VAE parts under
  ``torch.compile``; give them ``--warmup 1`` or more: the first step compiles, minutes at full size); fp16 with loss
  scaling (for GPUs without bf16); and bf16 + checkpointing with 8-bit AdamW (needs bitsandbytes).

All use the unpaired recipe's adapters (UNet LoRA rank 128, alpha 128; VAE LoRA rank 4 per direction, both
directions on one frozen VAE), batch 1, two PatchGAN discriminators (the paper's vision-aided CLIP discriminators need
downloaded CLIP weights; they add a frozen ViT-B/32) and LPIPS with a randomly initialised VGG16 trunk (same cost as
the pretrained one, no download). The weights are random: cost does not depend on their values.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` from just before the first iteration (weights, optimiser states
created by the first step, activations); on the CPU, the peak resident set size sampled while the iterations run.

Usage (from a checkout, ``PYTHONPATH=src`` unless the package is installed)::

    python benchmarks/train_unpaired.py --out bench/train_unpaired                    # GPU if present, 256 + 512 px
    python benchmarks/train_unpaired.py --config tiny --sizes 32 64 --out /tmp/tiny  # smoke test, seconds on a CPU

Writes ``OUT.json`` (every measurement) and ``OUT.md`` (the table).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

CASES = {
    "public": dict(step_mode="separate", mixed_precision="no", gradient_checkpointing=False),
    "ours-fp32": dict(step_mode="joint", mixed_precision="no", gradient_checkpointing=False),
    "ours-bf16": dict(step_mode="joint", mixed_precision="bf16", gradient_checkpointing=False),
    "ours-bf16-ckpt": dict(step_mode="joint", mixed_precision="bf16", gradient_checkpointing=True),
    "ours-bf16-nhwc": dict(step_mode="joint", mixed_precision="bf16", gradient_checkpointing=False),
    "ours-bf16-plain": dict(step_mode="joint", mixed_precision="bf16", gradient_checkpointing=False),
    "ours-bf16-compile": dict(step_mode="joint", mixed_precision="bf16", gradient_checkpointing=False, compile=True),
    "ours-fp32-compile": dict(step_mode="joint", mixed_precision="no", gradient_checkpointing=False, compile=True),
    "ours-fp16": dict(step_mode="joint", mixed_precision="fp16", gradient_checkpointing=False),
    "ours-bf16-ckpt-8bit": dict(
        step_mode="joint", mixed_precision="bf16", gradient_checkpointing=True, use_8bit_adam=True
    ),
}
DEFAULT_CASES = ("public", "ours-fp32", "ours-bf16-ckpt")


# --------------------------------------------------------------------------------------------------- one case (worker)


def _write_images(root: Path, size: int) -> None:
    """Two random images per domain and the two captions (the unpaired layout; no test split: no evaluation)."""
    rng = torch.Generator().manual_seed(0)
    for domain in ("A", "B"):
        folder = root / f"train_{domain}"
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (size, size, 3), generator=rng, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "fixed_prompt_a.txt").write_text("picture of a day street\n")
    (root / "fixed_prompt_b.txt").write_text("picture of a night street\n")


def _backbone(config: str, reference: Path, device: torch.device):
    if config == "tiny":
        from turbo_i2i.backbone import load_backbone

        return load_backbone("tiny", device=device)
    from turbo_i2i.benchmark import random_backbone

    return random_backbone(reference, device=device)  # initialised where it runs: seconds on a GPU


def _lpips(config: str):
    from turbo_i2i.training.pretrained import load_lpips, tiny_lpips

    # pretrained=False: the calibrated heads ship in the lpips wheel, the VGG16 trunk stays random (no download)
    return tiny_lpips() if config == "tiny" else load_lpips(pretrained=False)


@contextlib.contextmanager
def case_trainer(case: str, size: int, device: str, config: str, reference: Path):
    """The trainer of one case, on two random images per domain in a temporary folder (removed on exit).

    Args:
        case: a key of ``CASES``.
        size: image side in pixels.
        device: torch device.
        config: "full" (SD-Turbo's architecture from ``reference``) or "tiny" (the built-in tiny backbone).
        reference: the SD-Turbo config folder.

    Yields:
        the ``UnpairedTrainer``.
    """
    from accelerate import Accelerator

    from turbo_i2i.subpixel import restore_upsamplers
    from turbo_i2i.training.unpaired import UnpairedTrainConfig, UnpairedTrainer

    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        _write_images(Path(tmp) / "data", size)
        options = dict(
            dataset=str(Path(tmp) / "data"), output_dir=str(Path(tmp) / "run"), base_model=f"{config} (random)",
            transform="no_resize", batch_size=1, max_steps=10**6, lr_warmup_steps=0, disc="patchgan",
            eval_metrics="", checkpoint_every=10**9, eval_every=10**9, **CASES[case],
        )  # fmt: skip
        if config == "tiny":
            options["unet_lora_rank"] = 8
        trainer = UnpairedTrainer(
            UnpairedTrainConfig(**options),
            accelerator=Accelerator(cpu=dev.type == "cpu"),
            loss_networks=(_lpips(config), None),
            backbone=_backbone(config, reference, dev),
        )
        if has_plain_upsamplers(case):  # it upsamples, then convolves: the 3x3 convolutions run at the doubled size
            restore_upsamplers(trainer.upsampler_swaps)
        if case.endswith("-nhwc"):
            trainer.generator.to(memory_format=torch.channels_last)  # in place: shared frozen weights stay shared
        yield trainer


def has_plain_upsamplers(case: str) -> bool:
    """Whether the case keeps the VAE decoders' upsamplers as defined (no sub-pixel convolutions)."""
    return case == "public" or case.endswith("-plain")


def run_case(
    case: str, size: int, device: str, config: str, reference: Path, iters: int, warmup: int, profile: bool = False
) -> dict:
    """Build a trainer for one case and time its iterations.

    Args:
        case, size, device, config, reference: as for ``case_trainer``.
        iters: timed iterations (the median is reported).
        warmup: untimed iterations first (the first one allocates the optimiser states: its memory counts).
        profile: also profile one more iteration (``benchmark_harness.profile_step``, through ``measure_steps``),
        after the timed ones.

    Returns:
        the measurement.
    """
    from turbo_i2i.benchmark_harness import measure_steps

    dev = torch.device(device)
    with case_trainer(case, size, device, config, reference) as trainer:
        passes = []
        trainer.generator.register_forward_pre_hook(lambda module, args: passes.append(1))
        trained = sum(p.numel() for p in trainer.generator.parameters() if p.requires_grad)

        measured = measure_steps(trainer.train_step, dev, warmup, iters, profile)
        return dict(
            case=case, size=size, device=str(dev), config=config, **CASES[case],
            passes_per_iteration=len(passes) // (warmup + iters + profile), trained_parameters=trained,
            subpixel_upsampling=not has_plain_upsamplers(case),
            seconds_per_iteration=statistics.median(measured["seconds"]), **measured,
            memory_kind="torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS during the iterations",
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ the whole run


def markdown(report: dict) -> str:
    """The results as a markdown table, with the ratios to the public schedule at the same size."""
    from turbo_i2i.benchmark_harness import rounds_note, seconds_cell

    tiny = report["config"] == "tiny"  # its stand-ins: case_trainer
    lpips, rank = ("a tiny stand-in", 8) if tiny else ("random VGG16 trunk", 128)
    lines = [
        f"Unpaired training, {report['config']} architecture with random weights, batch 1, on {report['machine']}."
        f" Memory: {report['memory_kind']}. Discriminators: PatchGAN (no CLIP weights needed); LPIPS: {lpips};"
        f" UNet LoRA rank {rank}, VAE LoRA rank 4. Median of {report['steps']} iterations after"
        f" {report['warmup']} warm-up.{rounds_note(report)}",
        "",
        "| size | schedule | generator passes / it | s / it | peak memory (GiB) | memory vs public | time vs public |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    public = {r["size"]: r for r in report["results"] if r["case"] == "public" and "error" not in r}
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['case']} | | | {r['error']} | | |")
            continue
        base = public.get(r["size"])
        mem = f"{r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x" if base else ""
        sec = f"{r['seconds_per_iteration'] / base['seconds_per_iteration']:.2f}x" if base else ""
        lines.append(
            f"| {r['size']} | {r['case']} | {r['passes_per_iteration']} | {seconds_cell(r, 'seconds_per_iteration')} |"
            f" {r['peak_memory_gib']:.2f} | {mem} | {sec} |"
        )
    lines += ["", "Targets (issue 4): memory at most 0.5x and time at most 0.7x of the public schedule's."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from turbo_i2i.benchmark import machine_description, write_report
    from turbo_i2i.benchmark_harness import profile_markdown, run_training_cases, training_benchmark_arguments

    args = training_benchmark_arguments(argv, __doc__.splitlines()[0], sorted(CASES), list(DEFAULT_CASES), [256, 512])
    if args.worker:  # one case, in this fresh process: print its measurement as one JSON line
        result = run_case(
            args.cases[0],
            args.sizes[0],
            args.device,
            args.config,
            args.reference,
            args.steps,
            args.warmup,
            args.profile,
        )
        print(json.dumps(result))
        return 0

    def write(results: list[dict], show: bool = False) -> None:
        kinds = {r.get("memory_kind") for r in results if "memory_kind" in r}
        report = dict(
            machine=machine_description(torch.device(args.device)), device=args.device, config=args.config,
            steps=args.steps, warmup=args.warmup, rounds=args.rounds, memory_kind=", ".join(sorted(kinds)) or "n/a",
            torch=torch.__version__, results=results,
        )  # fmt: skip
        write_report(args.out, report, markdown(report) + profile_markdown(results), show)

    # the report is rewritten after every case: a run stopped from outside still leaves the finished ones
    write(run_training_cases(__file__, args, "seconds_per_iteration", on_result=write), show=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
