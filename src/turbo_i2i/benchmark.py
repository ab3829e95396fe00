"""Inference speed and memory of the full-size architecture with random weights (cost does not depend on values).

Two modes, measured in one process with interleaved repetitions so both see the same machine state:

- ``baseline``: what the public implementation does: unmerged peft LoRA, fp32, the prompt encoded on every call,
  the VAE posterior sampled;
- ``fast``: ``Translator``'s default path (merged LoRA, cached prompt, sub-pixel upsampling, channels-last where it
  is faster) in the chosen precision, optionally compiled.

Also reported: the FLOP count per component (torch's flop counter, on the meta device: no memory, no time), the
machine's measured peak (matmul and convolution probes in the same run) and the fraction of it each mode reaches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from . import preprocess as pre
from .backbone import Backbone, OneStepSchedule, build_clip_tokenizer, encode_prompt
from .config import GeneratorConfig
from .errors import BadInputError
from .generator import OneStepGenerator
from .pipeline import Translator, channels_last_is_faster
from .precision import computes_natively, dtype_name
from .subpixel import restore_upsamplers, use_subpixel_upsampling

PROMPT = "a photo of a red car on a mountain road, golden hour"
# LoRA ranks of the released edge_to_image model: UNet 8, VAE 4 (see reference/official-checkpoint-format.md).
OFFICIAL_PAIRED = GeneratorConfig(base_model="sd-turbo (random weights)", unet_lora_rank=8, vae_lora_rank=4)


@dataclass
class Case:
    """One measured configuration."""

    mode: str
    size: int
    batch: int


def _configs(reference: Path) -> tuple[dict, dict, dict]:
    missing = [
        f"{p}/config.json" for p in ("unet", "vae", "text_encoder") if not (reference / p / "config.json").is_file()
    ]
    if missing:
        raise BadInputError(
            f"{reference} is not a diffusers-layout config folder (missing {', '.join(missing)});"
            f" pass --reference pointing at shared/reference/sd-turbo-architecture."
        )
    unet = UNet2DConditionModel.load_config(reference / "unet")
    vae = AutoencoderKL.load_config(reference / "vae")
    text = json.loads((reference / "text_encoder" / "config.json").read_text())
    return unet, vae, text


def random_backbone(
    reference: str | Path, meta: bool = False, seed: int = 0, device: torch.device | str | None = None
) -> Backbone:
    """SD-Turbo's architecture from its configs, with random weights (or none at all on the meta device).

    Args:
        reference: a folder with ``unet/``, ``vae/`` and ``text_encoder/`` ``config.json`` files.
        meta: build on the meta device (shapes only, for FLOP counting).
        seed: seed of the random weights.
        device: where to create the weights (initialising 1.3 B parameters is much faster on a GPU).

    Returns:
        a ``Backbone`` with the real CLIP tokenizer.
    """
    unet_config, vae_config, text_config = _configs(Path(reference))
    text_config = {k: v for k, v in text_config.items() if not k.startswith("_") and k != "architectures"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if meta:
            context = init_empty_weights()
        else:
            context = torch.device(device) if device is not None else contextlib.nullcontext()
        with context, torch.no_grad():
            unet = UNet2DConditionModel.from_config(unet_config)
            vae = AutoencoderKL.from_config(vae_config)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return Backbone(build_clip_tokenizer(), text_encoder, unet, vae, OneStepSchedule.from_config({}), str(reference))


def random_fast_translator(reference: str | Path, device: torch.device) -> Translator:
    """The fast path as the diagnostic scripts under ``benchmarks/`` time it: the full-size architecture with random
    weights, the edge model's LoRA ranks (non-zero updates), merged, in ``default_precision(device)``.

    Args:
        reference: the configs folder (``default_reference()``).
        device: where it runs.

    Returns:
        the ``Translator`` (its generator is ``.generator``).
    """
    backbone = random_backbone(reference, device=device)
    generator = OneStepGenerator(OFFICIAL_PAIRED, backbone.unet, backbone.vae, backbone.schedule).to(device)
    _randomize_lora(generator, seed=1)
    backbone.text_encoder.to(device)
    return Translator(generator, backbone, fast=True, dtype=default_precision(device))


def _randomize_lora(generator: OneStepGenerator, seed: int) -> None:
    # B starts at zero (the adapter adds nothing); a trained model's B is not zero, and merging must be checked on it.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in generator.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)


def flop_split(
    reference: str | Path, size: int, config: GeneratorConfig = OFFICIAL_PAIRED, subpixel: bool = False
) -> dict[str, int]:
    """FLOPs of one translation at ``size`` x ``size``, batch 1, per component (counted on the meta device).

    Args:
        reference: the config folder.
        size: image side in pixels.
        config: the generator recipe (LoRA ranks add their own FLOPs).
        subpixel: count what the fast path runs (sub-pixel upsamplers) instead of the architecture as defined.

    Returns:
        component -> FLOPs, plus "total".
    """
    backbone = random_backbone(reference, meta=True)
    generator = OneStepGenerator(config, backbone.unet, backbone.vae, backbone.schedule)
    if subpixel:
        use_subpixel_upsampling(generator)
    vae = generator.vae[config.default_direction]
    device = torch.device("meta")
    ids = torch.zeros(1, backbone.tokenizer.model_max_length, dtype=torch.long, device=device)
    x = torch.zeros(1, 3, size, size, device=device)
    counts = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            embeds = backbone.text_encoder(ids)[0]
        counts["text_encoder"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            posterior, skips = vae.encode(x)
        counts["vae_encoder"] = counter.get_total_flops()
        z = posterior.mode()
        t = torch.full((1,), backbone.schedule.timestep, dtype=torch.long, device=device)
        with FlopCounterMode(display=False) as counter:
            generator.unet(z, t, encoder_hidden_states=embeds)
        counts["unet"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            vae.decode(z, skips)
        counts["vae_decoder"] = counter.get_total_flops()
    counts["total"] = sum(counts.values())
    return counts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """The machine's measured FLOP/s in ``dtype``: the best of a large matmul and a large 3x3 convolution.

    Args:
        device: where to measure.
        dtype: float32, bfloat16 or float16.
        seconds: time spent on each probe.

    Returns:
        FLOP/s.
    """
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    side = 128 if device.type == "cuda" else 64
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device, dtype).to(memory_format=torch.channels_last)
    img = torch.randn(4, 256, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    probes = [
        (lambda: a @ b, 2 * n**3),
        (lambda: conv(img), 2 * 4 * 256 * 256 * 9 * side * side),
    ]
    best = 0.0
    with torch.no_grad():
        for fn, flops in probes:
            fn()
            synchronize(device)
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                fn()
                count += 1
                synchronize(device)
            best = max(best, flops * count / (time.perf_counter() - start))
    return best


class PeakMemory:
    """Peak memory of one call: CUDA's allocator statistics, or the process's resident set sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        process = psutil.Process()
        self.peak = process.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()


def default_precision(device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively (recent CPUs, Ampere+ GPUs), else fp16 on GPU, else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if computes_natively(device, torch.bfloat16) else torch.float16
    if device.type == "cpu" and computes_natively(device, torch.bfloat16):
        return torch.bfloat16
    return torch.float32


def _baseline_call(generator: OneStepGenerator, backbone: Backbone, device: torch.device) -> Callable:
    def run(images: list[Image.Image]) -> list[Image.Image]:
        with torch.no_grad():
            embeds, _ = encode_prompt(backbone.tokenizer, backbone.text_encoder, [PROMPT] * len(images))
            x = pre.pil_to_tensor(images, value_range=(0.0, 1.0)).to(device)
            return pre.tensor_to_pil(generator(x, embeds, sample_posterior=True))

    return run


def run_benchmark(
    reference: str | Path,
    device: str | torch.device | None = None,
    sizes: tuple[int, ...] = (256, 512, 768),
    batches: tuple[int, ...] = (1, 4),
    modes: tuple[str, ...] = ("baseline", "fast"),
    precision: torch.dtype | None = None,
    compile: bool | str = False,
    repeats: int = 3,
    progress: Callable[[str], None] = print,
) -> dict:
    """Measure every (mode, size, batch) with interleaved repetitions, and the equivalence of the modes.

    Args:
        reference: the full-size config folder.
        device: where to run (CUDA when available, else CPU).
        sizes: image sides in pixels.
        batches: images per call.
        modes: "baseline" and/or "fast".
        precision: the fast mode's weight dtype (default: ``default_precision(device)``).
        compile: compile the fast mode's generator pass: True or a ``torch.compile`` mode (warm-up calls absorb the
            compile time).
        repeats: timed calls per case (one untimed warm-up call before).
        progress: called with a line per measurement.

    Returns:
        a JSON-ready dict: machine, settings, FLOPs, peak probes, per-case times and memory, equivalence.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or default_precision(device)
    progress(f"building the full-size generator with random weights on {device} ...")
    backbone = random_backbone(reference, device=device)
    generator = OneStepGenerator(OFFICIAL_PAIRED, backbone.unet, backbone.vae, backbone.schedule)
    _randomize_lora(generator, seed=1)
    calls: dict[str, Callable] = {}
    generator.to(device)
    backbone.text_encoder.to(device)
    translator = None
    if "fast" in modes:
        fast_backbone = dataclasses.replace(backbone, text_encoder=copy.deepcopy(backbone.text_encoder))
        translator = Translator(copy.deepcopy(generator), fast_backbone, fast=True, dtype=precision, compile=compile)
        calls["fast"] = lambda images: translator(images, prompt=PROMPT, edges=None, batch_size=len(images))
    if "baseline" in modes:
        calls["baseline"] = _baseline_call(generator, backbone, device)
    equivalence = _equivalence(generator, backbone, translator, min(sizes), device) if translator else {}
    if "baseline" not in modes:
        del generator, backbone

    cases = [Case(m, s, b) for s in sizes for b in batches for m in modes]
    inputs = {
        (s, b): [Image.effect_noise((s, s), 64).convert("RGB") for _ in range(b)] for s in sizes for b in batches
    }
    times: dict[tuple, list[float]] = {(c.mode, c.size, c.batch): [] for c in cases}
    memory: dict[tuple, int] = {}
    for case in cases:  # warm-up (and compilation), one call each
        calls[case.mode](inputs[case.size, case.batch])
    for rep in range(repeats):
        for case in cases:
            key = (case.mode, case.size, case.batch)
            synchronize(device)
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                calls[case.mode](inputs[case.size, case.batch])
                synchronize(device)
                times[key].append(time.perf_counter() - start)
            memory[key] = max(memory.get(key, 0), mem.peak)
            progress(f"  rep {rep + 1}/{repeats} {case.mode:8s} {case.size}px x{case.batch}: {times[key][-1]:.3f} s")

    progress("counting FLOPs and probing the machine's peak ...")
    flops = {s: flop_split(reference, s) for s in sizes}
    # The compute limit is the architecture's FLOPs at the peak; the fast path runs fewer (sub-pixel upsampling), so
    # its achieved rate is computed from what it runs.
    fast_flops = {s: flop_split(reference, s, subpixel=True)["total"] for s in sizes}
    peaks = {dtype_name(d): peak_flops(device, d) for d in {torch.float32, precision}}
    dtype_of = {"baseline": torch.float32, "fast": precision}
    rows = []
    for case in cases:
        key = (case.mode, case.size, case.batch)
        per_image = [t / case.batch for t in times[key]]
        median = statistics.median(per_image)
        total_flops = flops[case.size]["total"] * case.batch
        run_flops = (fast_flops[case.size] if case.mode == "fast" else flops[case.size]["total"]) * case.batch
        peak = peaks[dtype_name(dtype_of[case.mode])]
        rows.append(
            {
                "mode": case.mode,
                "size": case.size,
                "batch": case.batch,
                "dtype": dtype_name(dtype_of[case.mode]),
                "median_s_per_image": median,
                "min_s_per_image": min(per_image),
                "images_per_s": 1.0 / median,
                "peak_memory_gib": memory[key] / 2**30,
                "achieved_tflops": run_flops / statistics.median(times[key]) / 1e12,
                "fraction_of_peak": run_flops / statistics.median(times[key]) / peak,
                "x_compute_limit": statistics.median(times[key]) / (total_flops / peak),
            }
        )
    return {
        "machine": machine_description(device),
        "device": str(device),
        "fast_precision": dtype_name(precision),
        "compile": compile,
        "repeats": repeats,
        "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident set (sampled)",
        "flops": {str(s): f for s, f in flops.items()},
        "fast_flops": {str(s): f for s, f in fast_flops.items()},
        "peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
        "results": rows,
        "equivalence": equivalence,
    }


@torch.no_grad()
def _equivalence(
    generator: OneStepGenerator, backbone: Backbone, translator: Translator, size: int, device: torch.device
) -> dict:
    """Pixel differences on [0, 1] of the fast path (fp32, and the chosen precision) to the unmerged fp32 model.

    All three take the posterior's mode, so only merging, sub-pixel upsampling, memory layout and precision differ.
    """
    x = pre.pil_to_tensor([Image.effect_noise((size, size), 64).convert("RGB")], value_range=(0.0, 1.0)).to(device)
    embeds, _ = encode_prompt(backbone.tokenizer, backbone.text_encoder, [PROMPT])
    reference = generator(x, embeds).float()
    # The fast path in fp32, made from the baseline model and undone (a copy would leave the process's resident
    # memory higher for the timings): merged LoRA, sub-pixel upsampling, the layout fp32 gets.
    layout = torch.channels_last if channels_last_is_faster(device, torch.float32) else torch.contiguous_format
    generator.merge_lora()
    swaps = use_subpixel_upsampling(generator)
    try:
        fast32 = generator.to(memory_format=layout)(x.contiguous(memory_format=layout), embeds)
    finally:
        restore_upsamplers(swaps)
        generator.unmerge_lora()
        generator.to(memory_format=torch.contiguous_format)
    layout = torch.channels_last if translator.channels_last else torch.contiguous_format
    x_fast = x.to(translator.dtype).contiguous(memory_format=layout)
    fast = translator.forward(x_fast, translator.encode_prompt(PROMPT)).float()  # compiled, if it compiles

    def diff(a: torch.Tensor) -> dict[str, float]:
        d = (a.float() - reference).abs() / 2  # [-1, 1] -> [0, 1] pixel units
        return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}

    return {"size": size, "fast_float32": diff(fast32), f"fast_{dtype_name(translator.dtype)}": diff(fast)}


def default_reference(root: Path | None = None) -> Path:
    """The SD-Turbo config folder: ``shared/reference/sd-turbo-architecture`` inside ``root`` (machines that copy
    the working tree with it) or beside it (this project's checkout); ``root`` defaults to the working directory."""
    root = Path.cwd() if root is None else root
    candidates = [base / "shared" / "reference" / "sd-turbo-architecture" for base in (root, root.parent)]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def write_report(out: Path | None, report: dict, table: str, show: bool = True) -> None:
    """Print the markdown table (unless not ``show``) and, with ``out``, write ``OUT.json`` (every number) and
    ``OUT.md`` (the table)."""
    if show:
        print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(table)


def machine_description(device: torch.device) -> str:
    """A one-line description of the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _compiled(compile: bool | str) -> str:
    """How the report's ``compile`` setting reads in its table's caption."""
    if not compile:
        return ""
    return " + torch.compile" + ("" if compile in (True, "default") else f' (mode "{compile}")')


def markdown_table(report: dict) -> str:
    """The report's results as a markdown table (seconds per image, memory, share of the machine's peak)."""
    lines = [
        f"Machine: {report['machine']}; fast path in {report['fast_precision']}"
        f"{_compiled(report['compile'])}; median of {report['repeats']} interleaved calls;"
        f" memory: {report['memory']}.",
        "",
        "| mode | size | batch | dtype | s/image (median) | s/image (min) | images/s | peak memory GiB | TFLOP/s |"
        " % of peak | x compute limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['size']} | {r['batch']} | {r['dtype']} | {r['median_s_per_image']:.4f} |"
            f" {r['min_s_per_image']:.4f} | {r['images_per_s']:.2f} | {r['peak_memory_gib']:.2f} |"
            f" {r['achieved_tflops']:.2f} | {100 * r['fraction_of_peak']:.0f} | {r['x_compute_limit']:.2f} |"
        )
    lines += ["", "| size | text encoder | VAE encoder | UNet | VAE decoder | total (TFLOP) |", "|---" * 6 + "|"]
    for size, f in report["flops"].items():
        parts = [f[k] / 1e12 for k in ("text_encoder", "vae_encoder", "unet", "vae_decoder", "total")]
        lines.append(f"| {size} | " + " | ".join(f"{p:.3f}" for p in parts) + " |")
    runs = ", ".join(f"{f / 1e12:.3f} TFLOP at {size} px" for size, f in report["fast_flops"].items())
    lines += ["", f"The fast path runs {runs} (sub-pixel upsampling); the compute limit counts the table's totals."]
    return "\n".join(lines) + "\n"
