"""What keeping the sub-pixel upsamplers' kernels saves: the time every fast-path call spent computing them.

Full-size architecture with random weights, the edge model's LoRA ranks, merged, in the fast path's precision, as
``turbo-i2i bench`` builds it. Timed in one process: one fast-path forward (the kernels kept, as ``Translator`` runs
it), and the six upsamplers' ``phase_kernels`` in the model's layout (what each call computed before they were kept,
``subpixel.py`` / ``derived.py``).

Usage (from a checkout, ``PYTHONPATH=src`` unless the package is installed)::

    python benchmarks/subpixel_kernels.py --device cpu --size 512 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    from turbo_i2i import preprocess as pre
    from turbo_i2i.benchmark import (
        PROMPT,
        default_reference,
        machine_description,
        random_fast_translator,
        synchronize,
    )
    from turbo_i2i.cpu_memory import reuse_freed_memory
    from turbo_i2i.subpixel import SubPixelUpsample, phase_kernels

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, default=default_reference(Path(__file__).resolve().parents[1]))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as the turbo-i2i inference commands do
    translator = random_fast_translator(args.reference, device)
    generator = translator.generator
    layout = torch.channels_last if translator.channels_last else torch.contiguous_format
    image = Image.effect_noise((args.size, args.size), 64).convert("RGB")
    x = pre.pil_to_tensor([image], (-1.0, 1.0), device).to(translator.dtype).contiguous(memory_format=layout)
    embeds = translator.encode_prompt(PROMPT)
    upsamplers = [m for m in generator.modules() if isinstance(m, SubPixelUpsample)]
    weights = [(m.conv.get_base_layer() if hasattr(m.conv, "get_base_layer") else m.conv).weight for m in upsamplers]

    def forward() -> None:
        with torch.no_grad():
            translator.forward(x, embeds)

    def kernels() -> None:
        with torch.no_grad():
            for weight in weights:
                [k.contiguous(memory_format=layout) for k in phase_kernels(weight).values()]

    def median_seconds(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    call, computed = median_seconds(forward), median_seconds(kernels)
    print(
        f"{machine_description(device)}, {args.size} px, {str(translator.dtype).removeprefix('torch.')}, median of"
        f" {args.repeats}: a fast-path forward {call:.3f} s; the {len(upsamplers)} sub-pixel upsamplers' kernels"
        f" {computed:.3f} s, which every call also spent before they were kept ({computed / (call + computed):.0%} of"
        " such a call)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
