"""Where the fast path's time goes, uncompiled: one generator forward in channels-last against NCHW memory, and a
torch profile of it (top operators, kernel launches and host time per forward).

A diagnostic beside ``turbo-i2i bench`` (which gives the README's tables): full-size architecture with random
weights, the edge model's LoRA ranks, merged, in the chosen precision; both layouts measured in the same process,
alternated.

Usage (from a checkout, ``PYTHONPATH=src`` unless the package is installed)::

    python benchmarks/profile_inference.py --device cuda --size 512
    python benchmarks/profile_inference.py --reference /tmp/tinyref --device cpu --size 64   # tiny configs: seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> int:
    from turbo_i2i import preprocess as pre
    from turbo_i2i.benchmark import (
        PROMPT,
        default_reference,
        random_fast_translator,
        synchronize,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, default=default_reference(Path(__file__).resolve().parents[1]))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per layout and round (the median)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    translator = random_fast_translator(args.reference, device)
    generator = translator.generator
    images = [Image.effect_noise((args.size, args.size), 64).convert("RGB") for _ in range(args.batch)]
    embeds = translator.encode_prompt(PROMPT).expand(args.batch, -1, -1)
    x = pre.pil_to_tensor(images, (-1.0, 1.0), device).to(translator.dtype)

    def forward(x: torch.Tensor) -> None:
        with torch.no_grad():
            generator(x, prompt_embeds=embeds, direction=generator.config.default_direction)

    def median_ms(x: torch.Tensor) -> float:
        for _ in range(3):
            forward(x)
        times = []
        for _ in range(args.repeats):
            synchronize(device)
            start = time.perf_counter()
            forward(x)
            synchronize(device)
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    print(f"{args.size} px, batch {args.batch}, {translator.dtype}, {device}; the Translator's layout: "
          f"{'channels-last' if translator.channels_last else 'NCHW'}", flush=True)  # fmt: skip
    layouts = {"channels-last": torch.channels_last, "NCHW": torch.contiguous_format}
    for round_ in (1, 2):
        for name, layout in layouts.items():
            generator.to(memory_format=layout)
            print(f"round {round_}: {name} {median_ms(x.contiguous(memory_format=layout)):.2f} ms per forward")
    layout = torch.channels_last if translator.channels_last else torch.contiguous_format
    generator.to(memory_format=layout)
    x = x.contiguous(memory_format=layout)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    forward(x)
    with profile(activities=activities) as prof:
        for _ in range(3):
            forward(x)
        synchronize(device)
    events = prof.key_averages()
    launches = sum(e.count for e in events if "LaunchKernel" in e.key) / 3
    host_ms = sum(e.self_cpu_time_total for e in events) / 3 / 1e3
    print(f"per forward: {launches:.0f} kernel launches, {host_ms:.1f} ms of host time in operators")
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=15, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
