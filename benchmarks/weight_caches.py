"""What the fast path's two weight caches save on the CPU: oneDNN-packed weights (``prepack.py``) and the sub-pixel
upsamplers' kernels kept between calls (``subpixel.py``, ``derived.py``).

Full-size architecture with random weights, the edge model's LoRA ranks, merged, in bf16, as ``turbo-i2i bench``
builds it; one process. Packed and plain layers are timed in alternating rounds (``prepack_weights`` /
``unpack_weights`` on the same model, a warm-up call after each switch), and the packed copies' size is summed.
The sub-pixel kernels' cost is timed directly: what every call computed before they were kept (the six upsamplers'
``phase_kernels`` in the model's layout).

Usage (from a checkout, ``PYTHONPATH=src`` unless the package is installed)::

    python benchmarks/weight_caches.py --size 512 --repeats 5 --out benchmarks/results/weight-caches-cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    from turbo_i2i import preprocess as pre
    from turbo_i2i.benchmark import (
        OFFICIAL_PAIRED,
        PROMPT,
        _randomize_lora,
        default_precision,
        default_reference,
        machine_description,
        random_backbone,
    )
    from turbo_i2i.cpu_memory import reuse_freed_memory
    from turbo_i2i.derived import DerivedWeights
    from turbo_i2i.generator import OneStepGenerator
    from turbo_i2i.pipeline import Translator
    from turbo_i2i.prepack import prepack_weights, unpack_weights
    from turbo_i2i.subpixel import SubPixelUpsample, phase_kernels

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, default=default_reference(Path(__file__).resolve().parents[1]))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, help="write <out>.json")
    args = p.parse_args(argv)

    reuse_freed_memory()  # as the turbo-i2i inference commands do
    device = torch.device("cpu")
    dtype = default_precision(device)
    if dtype != torch.bfloat16:
        print("this CPU has no native bf16: the fast path runs in fp32 and nothing is packed", file=sys.stderr)
        return 2
    backbone = random_backbone(args.reference, device=device)
    generator = OneStepGenerator(OFFICIAL_PAIRED, backbone.unet, backbone.vae, backbone.schedule)
    _randomize_lora(generator, seed=1)
    translator = Translator(generator, backbone, fast=True, dtype=dtype)  # packs (lazily, at the first call)
    image = Image.effect_noise((args.size, args.size), 64).convert("RGB")
    x = pre.pil_to_tensor([image], (-1.0, 1.0), device).to(dtype).contiguous(memory_format=torch.channels_last)
    embeds = translator.encode_prompt(PROMPT)

    def forward() -> None:
        with torch.no_grad():
            translator.forward(x, embeds)

    def packed_bytes() -> int:  # the copies that exist now: the layers' and the sub-pixel kernels'
        caches = [v for m in generator.modules() for v in vars(m).values() if isinstance(v, DerivedWeights)]
        caches += [phase.packed for m in upsamplers if m._kernels._value for phase in m._kernels._value.values()]
        tensors = [c._value for c in caches if c is not None and isinstance(c._value, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    upsamplers = [m for m in generator.modules() if isinstance(m, SubPixelUpsample)]
    times: dict[str, list[float]] = {"packed": [], "plain": []}
    copies = 0
    for _ in range(args.rounds):
        for variant, swap in (("packed", prepack_weights), ("plain", unpack_weights)):
            swap(generator)
            forward()  # the packed copies are made in this call
            copies = max(copies, packed_bytes())
            for _ in range(args.repeats):
                start = time.perf_counter()
                forward()
                times[variant].append(time.perf_counter() - start)
            print(f"  {variant}: {statistics.median(times[variant][-args.repeats :]):.3f} s", file=sys.stderr)

    weights = [(m.conv.get_base_layer() if hasattr(m.conv, "get_base_layer") else m.conv).weight for m in upsamplers]
    kernel_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for weight in weights:
            [k.contiguous(memory_format=torch.channels_last) for k in phase_kernels(weight).values()]
        kernel_times.append(time.perf_counter() - start)

    report = {
        "machine": machine_description(device),
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds_per_image": {k: statistics.median(v) for k, v in times.items()},
        "all_seconds": times,
        "packed_copies_gib": copies / 2**30,
        "subpixel_upsamplers": len(upsamplers),
        "subpixel_kernels_seconds_per_call": statistics.median(kernel_times),
    }
    speedup = report["seconds_per_image"]["plain"] / report["seconds_per_image"]["packed"]
    print(
        f"{report['machine']}, {args.size} px, bf16, median of {args.repeats * args.rounds} calls: packed"
        f" {report['seconds_per_image']['packed']:.3f} s, plain {report['seconds_per_image']['plain']:.3f} s"
        f" ({speedup:.2f}x); the packed copies take {report['packed_copies_gib']:.2f} GiB;"
        f" the {len(upsamplers)} sub-pixel upsamplers' kernels took {report['subpixel_kernels_seconds_per_call']:.3f}"
        " s to compute, which every call spent before they were kept"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
