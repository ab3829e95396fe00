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

import argparse
import contextlib
import copy
import dataclasses
import json
import platform
import statistics
import sys
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


def _sync(device: torch.device) -> None:
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
            _sync(device)
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                fn()
                count += 1
                _sync(device)
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
            _sync(device)
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                calls[case.mode](inputs[case.size, case.batch])
                _sync(device)
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


def time_steps(
    step: Callable[[], object], device: torch.device, warmup: int, repeats: int, gpu_states: list | None = None
) -> tuple[list[float], int]:
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` untimed ones, and the peak memory of all.

    Args:
        step: one training step (or any call) to time.
        device: where it runs (CUDA is synchronised around each call).
        warmup: untimed calls first (their memory counts: the first step allocates the optimiser states).
        repeats: timed calls.
        gpu_states: on an NVIDIA GPU, ``gpu_state`` is appended to it after each timed call (outside the timing), to
            tell a GPU that lowers its clocks as it heats from a step that got slower.

    Returns:
        (seconds per timed call, peak bytes: ``torch.cuda.max_memory_allocated`` or the sampled peak RSS).
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
    times = []
    with PeakMemory(device) as memory:
        for i in range(warmup + repeats):
            _sync(device)
            started = time.perf_counter()
            step()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - started)
                if gpu_states is not None and device.type == "cuda":
                    gpu_states.append(gpu_state(device))
    return times, memory.peak


def measure_steps(step: Callable[[], object], device: torch.device, warmup: int, repeats: int, profile: bool) -> dict:
    """What the training benchmarks record of a case's steps: ``time_steps`` (with the GPU's state after each timed
    step) and, when asked, ``profile_step`` of one more step.

    Args:
        step, device, warmup, repeats: as for ``time_steps``.
        profile: also profile one more step, after the timed ones.

    Returns:
        {"seconds", "peak_memory_gib", "gpu_states"} and, with ``profile``, "profile".
    """
    gpu_states: list = []
    times, peak = time_steps(step, device, warmup, repeats, gpu_states)
    measured = dict(seconds=times, peak_memory_gib=peak / 2**30, gpu_states=gpu_states)
    if profile:
        measured["profile"] = profile_step(step, device)
    return measured


GPU_STATE_FIELDS = ("clocks.sm", "temperature.gpu", "power.draw")


def gpu_state(device: torch.device) -> dict | None:
    """The NVIDIA GPU's SM clock (MHz), temperature (C) and power draw (W) now, as ``nvidia-smi`` reports them.

    Args:
        device: a CUDA device.

    Returns:
        {"sm_mhz", "temperature_c", "power_w"}, or None where ``nvidia-smi`` is missing or does not answer.
    """
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        # by UUID: nvidia-smi numbers the GPUs its own way, CUDA_VISIBLE_DEVICES renumbers them for torch
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        fields = ",".join(GPU_STATE_FIELDS)
        query = ["nvidia-smi", "-i", uuid, f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
    except (AttributeError, OSError, subprocess.SubprocessError):
        return None
    return parse_gpu_state(done.stdout)


def parse_gpu_state(line: str) -> dict | None:
    """``nvidia-smi``'s "clock, temperature, power" line as numbers (None for what it cannot read, e.g. "[N/A]")."""
    values = [v.strip() for v in line.strip().split(",")]
    if len(values) != len(GPU_STATE_FIELDS):
        return None

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    return dict(zip(("sm_mhz", "temperature_c", "power_w"), map(number, values)))


def profile_step(step: Callable[[], object], device: torch.device, rows: int = 12) -> dict:
    """One call of ``step`` under ``torch.profiler``: where its time goes (is it bound by the host or the device?).

    Args:
        step: the call to profile (run it once before, so that first-call costs are not counted).
        device: where it runs.
        rows: how many operators to list.

    Returns:
        ``wall_ms`` (the call, synchronised), ``host_ms`` (self CPU time of the operators and CUDA runtime calls; the
        Python between them is not counted), ``device_ms`` (self time of all CUDA kernels; 0 on the CPU),
        ``operators`` (ATen operator calls, nested ones included), ``kernel_launches``, ``syncs`` (reads of a device
        value on the host, e.g. ``.item()``: each waits for the device), and ``top``: the ``rows`` operators with the
        most self time (device time on CUDA).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        _sync(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def self_ms(event) -> float:
        return (event.self_device_time_total if on_device else event.self_cpu_time_total) / 1e3

    top = sorted(events, key=self_ms, reverse=True)[:rows]
    return dict(
        wall_ms=1e3 * wall,
        host_ms=sum(e.self_cpu_time_total for e in events) / 1e3,
        device_ms=sum(e.self_device_time_total for e in events) / 1e3 if on_device else 0.0,
        operators=sum(e.count for e in events if e.key.startswith("aten::")),
        kernel_launches=sum(e.count for e in events if "LaunchKernel" in e.key),
        syncs=sum(e.count for e in events if e.key == "aten::_local_scalar_dense"),
        top=[dict(name=e.key, calls=e.count, self_ms=round(self_ms(e), 3)) for e in top],
    )


def profile_markdown(results: list[dict]) -> str:
    """The ``profile`` entries of a training benchmark's results as a markdown section ("" when none has one).

    Args:
        results: the cases' measurements; those profiled carry ``profile_step``'s dict under ``profile``.

    Returns:
        a table of wall, host and device time, operator calls, launches and syncs per step, then each case's busiest
        operators.
    """
    profiled = [r for r in results if "profile" in r]
    if not profiled:
        return ""
    lines = [
        "",
        "One more step of each case under torch.profiler (host: self CPU time of operators and CUDA runtime calls):",
        "",
        "| size | case | wall ms | host ms | device ms | ATen calls (nested included) | kernel launches | syncs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in profiled:
        f = r["profile"]
        lines.append(
            f"| {r['size']} | {r['case']} | {f['wall_ms']:.0f} | {f['host_ms']:.0f} | {f['device_ms']:.0f} |"
            f" {f['operators']} | {f['kernel_launches']} | {f['syncs']} |"
        )
    for r in profiled:
        top = ", ".join(f"{t['name']} {t['self_ms']:.1f} ms ({t['calls']})" for t in r["profile"]["top"])
        lines += ["", f"{r['size']} px {r['case']}, most self time: {top}"]
    return "\n".join(lines) + "\n"


def default_reference(root: Path | None = None) -> Path:
    """The SD-Turbo config folder: ``shared/reference/sd-turbo-architecture`` inside ``root`` (machines that copy
    the working tree with it) or beside it (this project's checkout); ``root`` defaults to the working directory."""
    root = Path.cwd() if root is None else root
    candidates = [base / "shared" / "reference" / "sd-turbo-architecture" for base in (root, root.parent)]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def training_benchmark_arguments(
    argv: list[str] | None, description: str, cases: list[str], default_cases: list[str], default_sizes: list[int]
) -> argparse.Namespace:
    """The command line shared by the training benchmarks (``benchmarks/train_*.py``).

    Args:
        argv: the arguments (None: ``sys.argv``).
        description: the script's one-line description.
        cases: every case the script can run.
        default_cases: those run when ``--cases`` is not given.
        default_sizes: image sides run when ``--sizes`` is not given.

    Returns:
        the parsed arguments (device, sizes, cases, config, reference, steps, warmup, timeout, rounds, out, profile,
        worker).
    """
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=default_sizes)
    parser.add_argument("--cases", nargs="+", choices=cases, default=default_cases)
    parser.add_argument("--config", choices=("full", "tiny"), default="full", help="tiny: a smoke test in seconds")
    parser.add_argument("--reference", type=Path, default=default_reference(repo), help="the SD-Turbo configs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (their memory counts)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case before it is abandoned")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run the cases this many times, every other round in reverse order (machine drift falls on all alike)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one more step per case (host vs device time, operators)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.config == "full" and not (args.reference / "unet" / "config.json").is_file():
        parser.error(f"{args.reference} does not hold the SD-Turbo configs; pass --reference")
    return args


def run_training_cases(
    script: str, args: argparse.Namespace, median_key: str, on_result: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """Run every (size, case) of a training benchmark ``args.rounds`` times, each run in a fresh ``script --worker``
    process; odd rounds run the cases in reverse order, so a machine that slows down as it warms up (GPU clocks)
    weighs on every case alike.

    Args:
        script: the benchmark script's path.
        args: its parsed ``training_benchmark_arguments``.
        median_key: the measurement's seconds-per-step key, recomputed as the median over every round's ``seconds``.
        on_result: called with the results so far after each run (to write a partial report that a run stopped
            from outside still leaves behind).

    Returns:
        one measurement (or ``error``) per (size, case), in the order of ``args.sizes`` and ``args.cases``; with
        several rounds, ``seconds`` (and ``gpu_states``) hold every round's steps, ``round_medians`` each round's
        median, and the peak memory is the largest of the rounds'. Each run is also printed to stderr as it arrives.
    """
    results: dict[tuple[int, str], dict] = {}
    for round_ in range(args.rounds):
        for size in args.sizes:
            for case in args.cases if round_ % 2 == 0 else args.cases[::-1]:
                profile = args.profile and round_ == 0
                command = [
                    sys.executable, script, "--worker", "--cases", case, "--sizes", str(size), "--device", args.device,
                    "--config", args.config, "--reference", str(args.reference), "--steps", str(args.steps),
                    "--warmup", str(args.warmup), *(["--profile"] if profile else []),
                ]  # fmt: skip
                run = {"case": case, "size": size, **run_worker(command, args.timeout)}
                results[size, case] = merge_rounds(results.get((size, case)), run, median_key)
                shown = {k: v for k, v in run.items() if k not in ("seconds", "profile")}
                print(json.dumps(shown), file=sys.stderr, flush=True)
                if on_result is not None:
                    on_result(ordered(results, args))
    return ordered(results, args)


def ordered(results: dict[tuple[int, str], dict], args: argparse.Namespace) -> list[dict]:
    """The measurements so far, in the order of ``args.sizes`` and ``args.cases``."""
    return [results[size, case] for size in args.sizes for case in args.cases if (size, case) in results]


def merge_rounds(earlier: dict | None, run: dict, median_key: str) -> dict:
    """One case's measurement over its rounds so far.

    Args:
        earlier: the merged measurement of the earlier rounds (None in the first).
        run: this round's measurement (or ``error``).
        median_key: the seconds-per-step key, recomputed over every round's ``seconds``.

    Returns:
        the merged measurement; a round that failed is counted in ``failed_rounds`` and otherwise left out (the
        first round's error when every round failed).
    """
    failed = (earlier or {}).get("failed_rounds", 0) + ("error" in run)
    if "error" in run:
        merged = dict(earlier or run)  # what the earlier rounds measured, if any
    elif earlier is None or "error" in earlier:
        merged = {**run, "round_medians": [run[median_key]]}
    else:
        seconds = earlier["seconds"] + run["seconds"]
        merged = {
            **earlier,
            "seconds": seconds,
            median_key: statistics.median(seconds),
            "round_medians": earlier["round_medians"] + [run[median_key]],
            "gpu_states": earlier.get("gpu_states", []) + run.get("gpu_states", []),
            "peak_memory_gib": max(earlier["peak_memory_gib"], run["peak_memory_gib"]),
        }
    if failed:
        merged["failed_rounds"] = failed
    return merged


def rounds_note(report: dict) -> str:
    """How a training benchmark's medians were taken over rounds ("" for one round), for its table's caption."""
    rounds = report.get("rounds", 1)
    if rounds == 1:
        return ""
    return (
        f" Each case ran {rounds} times, each in a fresh process, every other round in reverse order; the median is"
        " over all of their timed steps, each round's median in brackets."
    )


def seconds_cell(result: dict, median_key: str) -> str:
    """A table cell with the median seconds per step and, over several rounds, each round's median."""
    cell = f"{result[median_key]:.3f}"
    if len(result.get("round_medians", [])) > 1:
        cell += " (" + ", ".join(f"{m:.3f}" for m in result["round_medians"]) + ")"
    return cell


def run_worker(command: list[str], timeout: float) -> dict:
    """Run one benchmark case in a fresh process (so its memory is its own) and read the JSON line it prints last.

    Args:
        command: the worker's command line; it prints its measurement as one JSON object on a line of its own.
        timeout: seconds before the case is abandoned.

    Returns:
        the measurement, or ``{"error": ...}`` saying why there is none (timed out, out of memory, the last lines of
        the worker's error output).
    """
    import subprocess

    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        if "OutOfMemoryError" in done.stderr:
            return {"error": "out of memory"}
        return {"error": " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])}
    return json.loads(lines[-1])


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
