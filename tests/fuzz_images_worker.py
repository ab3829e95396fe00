"""Fuzz the image loading path under a memory cap; run in its own process by test_fuzz_images.py.

Every generated file goes through ``preprocess.load_image`` and ``Translator`` (the built-in demo model). Each must
either give an RGB picture of the input's size or raise our ``BadInputError`` whose message names the file: any other
exception, a case over its deadline, or a ``MemoryError`` under the address-space cap fails the run. Prints one JSON
line: cases per strategy, outcomes, the cap and the peak memory.

Usage: python fuzz_images_worker.py WORKDIR [EXAMPLES_PER_STRATEGY]

test_fuzz_images.py also imports the file builders (``encoded``, ``png_file``, ``with_size``, ``MODE_FORMATS``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import struct
import sys
import time
import warnings
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from turbo_i2i import preprocess as pre
from turbo_i2i.errors import BadInputError
from turbo_i2i.pipeline import Translator
from turbo_i2i.registry import load_model

CAP_HEADROOM = 1536 << 20  # address space allowed beyond what the loaded model and libraries already map
TRANSLATE_MAX_PIXELS = 512 * 512  # bounds the model's work per case; load_image keeps the library's own limit
EXAMPLES = 100  # per strategy (a third of it for the slower animated files): 434 cases, about 10 s
OUTCOMES: Counter = Counter()
CASES: Counter = Counter()


# --- crafted files ---------------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, depth: int = 8, color_type: int = 2, pixels: bytes | None = None) -> bytes:
    """A PNG with any header (sizes beyond what Pillow can write, 16-bit RGB) and the given raw scanlines."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = zlib.compress(pixels if pixels is not None else b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def with_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """Patch the declared size in a small valid file's header (a decompression bomb claims a huge one)."""
    data = bytearray(data)
    if fmt == "JPEG":
        at = data.index(b"\xff\xc0") + 5
        data[at : at + 4] = struct.pack(">HH", min(height, 65535), min(width, 65535))
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", min(width, 65535), min(height, 65535))
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", min(width, 2**31 - 1), min(height, 2**31 - 1))
    elif fmt == "WEBP":  # a VP8X canvas (24-bit sizes minus one) in front of the small image
        canvas = b"".join((min(max(side, 1), 2**24) - 1).to_bytes(3, "little") for side in (width, height))
        body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + bytes(4) + canvas + bytes(data[12:])
        data = bytearray(b"RIFF" + struct.pack("<I", len(body)) + body)
    return bytes(data)


# Modes, and the formats Pillow can write each in: every odd mode and bit depth the issue lists.
MODE_FORMATS = {
    "1": ["PNG", "BMP", "GIF", "TIFF"],
    "L": ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"],
    "LA": ["PNG", "TIFF", "WEBP"],
    "P": ["PNG", "BMP", "GIF", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],  # Pillow writes 32-bit integer images to TIFF only (its PNG writer for them is deprecated)
    "F": ["TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "RGB": ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"],
    "RGBA": ["PNG", "WEBP", "TIFF"],
}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff"}
MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"RIFF\0\0\0\0WEBPVP8 ",
    b"BM",
    b"II*\0",
    b"%!PS-Adobe",
]


def picture(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode in ("I;16", "I"):
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).convert(mode)
    if mode == "F":
        return Image.fromarray(rng.normal(128, 80, (height, width)).astype(np.float32))
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)


sizes = st.integers(1, 24).flatmap(lambda w: st.tuples(st.just(w), st.integers(max(1, (w + 3) // 4), min(24, 4 * w))))
valid_images = st.sampled_from(sorted(MODE_FORMATS)).flatmap(
    lambda mode: st.tuples(st.just(mode), st.sampled_from(MODE_FORMATS[mode]), sizes, st.integers(0, 2**16))
)


def encoded(mode: str, fmt: str, size: tuple[int, int], seed: int) -> bytes:
    return encode(picture(mode, *size, seed), fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))


# --- the property ----------------------------------------------------------------------------------------------------


def check(data: bytes, suffix: str, strategy: str, size: tuple[int, int] | None = None) -> Image.Image | None:
    """Write ``data`` and load + translate it; returns the loaded RGB picture (None when refused)."""
    CASES[strategy] += 1
    path = Path(sys.argv[1]) / f"case{suffix}"
    path.write_bytes(data)
    try:
        rgb = pre.load_image(path)
    except BadInputError as error:
        assert str(path) in str(error), f"the message does not name the file: {error}"
        outcome = "refused"
        try:
            TRANSLATOR(path)
        except BadInputError:
            pass
        else:
            raise AssertionError("load_image refused the file but the Translator accepted it")
        rgb = None
    else:
        assert rgb.mode == "RGB" and rgb.width >= 1 and rgb.height >= 1
        assert size is None or rgb.size == size, (rgb.size, size)
        try:
            out = TRANSLATOR(path)
        except BadInputError as error:  # only its own, smaller pixel limit may refuse what load_image took
            assert "pixels" in str(error), error
            outcome = "refused by the translator's size limit"
        else:
            assert out.mode == "RGB" and out.size == rgb.size
            outcome = "translated"
    OUTCOMES[f"{strategy}: {outcome}"] += 1
    return rgb


def run_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=10),  # per case; a tiny 64 px translation takes ~0.05 s, a 64 x 256 strip ~0.2 s
        derandomize=os.environ.get("TURBO_I2I_FUZZ_RANDOM") != "1",  # CI reruns the same cases unless asked
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )


@given(st.sampled_from(MAGIC), st.binary(max_size=2048), st.sampled_from(sorted(SUFFIX.values())))
def random_bytes(magic, tail, suffix):
    check(magic + tail, suffix, "random bytes")


@given(valid_images)
def odd_modes_and_formats(case):
    mode, fmt, size, seed = case
    check(encoded(mode, fmt, size, seed), SUFFIX[fmt], "valid image, any mode", size)


@given(valid_images, st.data())
def truncated_or_corrupted(case, data):
    mode, fmt, size, seed = case
    blob = bytearray(encoded(mode, fmt, size, seed))
    if data.draw(st.booleans(), "truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), "cut at")]
    else:
        for _ in range(data.draw(st.integers(1, 8), "flips")):
            blob[data.draw(st.integers(0, len(blob) - 1), "at")] ^= data.draw(st.integers(1, 255), "xor")
    check(bytes(blob), SUFFIX[fmt], "truncated or corrupted")


@given(
    st.sampled_from(["PNG", "PNG16", "JPEG", "GIF", "BMP", "WEBP"]),
    st.integers(0, 2**31 - 1) | st.sampled_from([0, 1, 4097, 65535, 100000]),
    st.integers(0, 2**31 - 1) | st.sampled_from([0, 1, 4097, 65535, 100000]),
)
def declared_sizes(fmt, width, height):
    if fmt.startswith("PNG"):
        data = png_file(width, height, depth=16 if fmt == "PNG16" else 8)
    else:
        data = with_size(encode(Image.new("RGB", (8, 8), (10, 20, 30)), fmt), fmt, width, height)
    check(data, SUFFIX["PNG" if fmt == "PNG16" else fmt], "declared size (bombs, zero)")


@given(st.sampled_from(["GIF", "WEBP"]), st.integers(2, 4), sizes, st.integers(0, 2**16))
def animated(fmt, n_frames, size, seed):
    rng = np.random.default_rng(seed)
    colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n_frames)]
    frames = [Image.new("RGB", size, colour) for colour in colours]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with Image.open(io.BytesIO(data)) as probe:
        first = probe.convert("RGB")  # what the first frame decodes to (GIF quantises the colour)
        animated_file = probe.is_animated  # identical neighbouring frames may be merged by the encoder
    NOTICES.clear()
    rgb = check(data, SUFFIX[fmt], "animated")
    assert rgb is not None and np.array_equal(np.asarray(rgb), np.asarray(first)), "not the first frame"
    assert not animated_file or any("first frame" in notice for notice in NOTICES), NOTICES


class Notices(logging.Handler):
    def emit(self, record):
        NOTICES.append(record.getMessage())


NOTICES: list[str] = []


def vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


if __name__ == "__main__":
    EXAMPLES = int(sys.argv[2]) if len(sys.argv) > 2 else EXAMPLES
    warnings.filterwarnings("ignore", module="PIL")  # Pillow's notes on corrupt EXIF etc.: not failures, just noise
    torch.set_num_threads(1)
    logging.getLogger("turbo_i2i").addHandler(Notices())
    logging.getLogger("turbo_i2i").propagate = False
    TRANSLATOR = Translator(*load_model("demo-circles"), max_pixels=TRANSLATE_MAX_PIXELS)
    TRANSLATOR(Image.new("RGB", (64, 64)))  # first call: lazy allocations happen before the cap
    cap = vm_size() + CAP_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:  # the cap is real: an allocation over it fails here
        bytearray(CAP_HEADROOM + (256 << 20))
        raise AssertionError("the memory cap is not enforced")
    except MemoryError:
        pass
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    share = {random_bytes: 1.0, odd_modes_and_formats: 1.0, truncated_or_corrupted: 1.0, declared_sizes: 1.0,
             animated: 0.34}  # fmt: skip
    for test, weight in share.items():
        run_settings(max(1, round(EXAMPLES * weight)))(test)()
    print(
        json.dumps(
            {
                "cases": dict(CASES),
                "total": sum(CASES.values()),
                "outcomes": dict(OUTCOMES),
                "seconds": time.perf_counter() - started,
                "cap_headroom_mib": CAP_HEADROOM >> 20,
                "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) >> 20,
            }
        )
    )
