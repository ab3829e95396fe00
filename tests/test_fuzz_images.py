"""Hostile images: every file either translates or fails with our BadInputError naming it; never another exception,
a hang or a memory blow-up.

The fuzz run (hypothesis, 434 cases) happens in a subprocess under an address-space cap (``RLIMIT_AS``), so a
decoder that tried to allocate for a decompression bomb would fail there without disturbing torch in this process;
the named cases below pin the promises one by one.
"""

import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fuzz_images_worker import MODE_FORMATS, SUFFIX, encode, encoded, png_file, with_size
from PIL import Image

from turbo_i2i import preprocess as pre
from turbo_i2i.errors import BadInputError
from turbo_i2i.pipeline import Translator

WORKER = Path(__file__).with_name("fuzz_images_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def translator():
    return Translator.from_pretrained("demo-circles")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the memory cap reads /proc (Linux)")
def test_fuzzed_files_translate_or_fail_with_our_error_under_a_memory_cap(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-6000:]  # hypothesis prints the falsifying example
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["total"] == 434 and set(report["cases"]) == {
        "random bytes", "valid image, any mode", "truncated or corrupted", "declared size (bombs, zero)", "animated",
    }  # fmt: skip
    outcomes = report["outcomes"]
    assert outcomes["valid image, any mode: translated"] == report["cases"]["valid image, any mode"]
    assert outcomes["animated: translated"] == report["cases"]["animated"]
    assert outcomes["random bytes: refused"] == report["cases"]["random bytes"]
    assert outcomes["truncated or corrupted: refused"] > 0 and outcomes["declared size (bombs, zero): refused"] > 0
    assert report["seconds"] < 60 and time.monotonic() - started < 120
    assert report["peak_rss_growth_mib"] < report["cap_headroom_mib"]


def crafted_png(tmp_path, width, height, **kwargs):
    path = tmp_path / "crafted.png"
    path.write_bytes(png_file(width, height, **kwargs))
    return path


def test_a_png_claiming_100000_by_100000_is_refused_before_decoding(tmp_path, translator):
    path = crafted_png(tmp_path, 100000, 100000)
    assert path.stat().st_size < 200
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(BadInputError, match=rf"Image '{path}' is too large .*claims more than {pre.MAX_PIXELS} pix"):
        pre.load_image(path)
    with pytest.raises(BadInputError, match="too large"):
        translator(path)
    # a caller's limit above Pillow's own: the message names the limit that refused it, Pillow's
    pillow = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadInputError, match=rf"more than {pillow} pixels, the most Pillow decodes"):
        pre.load_image(path, max_pixels=10**11)
    assert time.perf_counter() - started < 1.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024 < 50 << 20  # 30 GB never allocated


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "BMP", "WEBP"])
def test_other_formats_claiming_huge_sizes_are_refused(tmp_path, fmt):
    path = tmp_path / f"bomb{SUFFIX[fmt]}"
    path.write_bytes(with_size(encode(Image.new("RGB", (8, 8)), fmt), fmt, 65535, 65535))
    with pytest.raises(BadInputError, match=str(path)):
        pre.load_image(path)


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_zero_size_images_are_refused(tmp_path, size):
    path = crafted_png(tmp_path, *size)
    with pytest.raises(BadInputError, match=str(path)):
        pre.load_image(path)
    with pytest.raises(BadInputError, match="has no pixels"):
        pre.load_image_or_pil(Image.new("RGB", size))


def test_a_tiny_strip_cannot_demand_a_huge_model_size(tmp_path):
    """A 1 x 4000 strip (a few hundred bytes) would run at 64 x 256000: refused by the pixel limit before decoding."""
    path = tmp_path / "strip.png"
    Image.new("L", (1, 4000)).save(path)
    small = Translator.from_pretrained("demo-circles")
    small.max_pixels = 512 * 512  # a service bounds each request's work with its translator's pixel limit
    with pytest.raises(BadInputError, match=r"strip.png.*would run at 64x256000.*aspect ratio"):
        small(path)
    assert pre.load_image(tmp_path / "strip.png").size == (1, 4000)  # within the library's default limit


CASES = [(mode, fmt) for mode, formats in MODE_FORMATS.items() for fmt in formats]


@pytest.mark.parametrize("mode,fmt", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_every_mode_and_bit_depth_translates_at_its_size(tmp_path, translator, mode, fmt):
    path = tmp_path / f"in{SUFFIX[fmt]}"
    path.write_bytes(encoded(mode, fmt, (13, 7), seed=1))
    out = translator(path)
    assert out.mode == "RGB" and out.size == (13, 7)


def test_16_bit_rgb_png_and_one_pixel_images_translate(tmp_path, translator):
    rng = np.random.default_rng(0)
    rows = b"".join(b"\0" + rng.integers(0, 256, 6 * 5, dtype=np.uint8).tobytes() for _ in range(4))
    path = crafted_png(tmp_path, 5, 4, depth=16, color_type=2, pixels=rows)
    assert translator(path).size == (5, 4)
    for mode in ("1", "L", "RGB", "RGBA", "I;16", "F"):
        assert translator(pre.load_image_or_pil(Image.new(mode, (1, 1)))).size == (1, 1)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_files_use_their_first_frame_with_a_notice(tmp_path, translator, fmt, caplog):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / f"anim{SUFFIX[fmt]}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        rgb = pre.load_image(path)
    assert np.array_equal(np.asarray(rgb), np.asarray(frames[0]))
    assert f"Image '{path}' is animated; only its first frame is used." in caplog.text
    assert translator(path).size == (16, 16)


def test_formats_outside_the_decoder_list_are_refused_whatever_their_name(tmp_path):
    """Pillow can open dozens of formats, some through external programs (EPS runs Ghostscript); we decode only
    PNG, JPEG, WebP, BMP, GIF and TIFF."""
    for fmt, name in (("PPM", "x.png"), ("TGA", "x.jpg"), ("ICO", "x.webp"), ("PCX", "x.bmp")):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format=fmt)
        with pytest.raises(BadInputError, match="cannot be decoded.*turbo-i2i reads PNG, JPEG"):
            pre.load_image(tmp_path / name)
    (tmp_path / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(BadInputError, match="not an image turbo-i2i reads"):
        pre.load_image(tmp_path / "x.eps")
