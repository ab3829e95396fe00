"""Tests for turbo_i2i.preprocess: every file is generated in tmp_path, nothing is downloaded."""

from __future__ import annotations

import errno
import io
import logging
import os
import pathlib
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from turbo_i2i import preprocess
from turbo_i2i.errors import BadInputError, TurboI2IError
from turbo_i2i.preprocess import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    canny,
    list_images,
    load_image,
    load_image_or_pil,
    model_size,
    pil_to_tensor,
    save_image,
    sketch,
    tensor_to_pil,
)


def _noise(width: int = 32, height: int = 24, seed: int = 0) -> Image.Image:
    """A deterministic random RGB picture (no flat areas, so truncation is always visible to the decoder)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim ``width`` x ``height`` (with a correct CRC)."""
    data = bytearray(_encoded(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------------
# load_image: bad inputs, one test each
# ----------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(BadInputError, match="does not exist") as info:
        load_image(missing)
    assert "nope.png" in str(info.value)


def test_folder_passed_as_file(tmp_path):
    with pytest.raises(BadInputError, match="is a folder"):
        load_image(tmp_path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(BadInputError, match="cannot be decoded: it is damaged .* or not really a PNG file") as info:
        load_image(path)
    assert "notes.png" in str(info.value)
    (tmp_path / "empty.jpg").write_bytes(b"")  # was "not an image turbo-i2i reads ...; use one of .jpg, ..."
    with pytest.raises(BadInputError, match=r"empty.jpg' is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(BadInputError, match="not an image turbo-i2i reads .*; use one of .jpg"):
        load_image(tmp_path / "notes.txt")


def test_corrupt_bytes_after_valid_signature(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(BadInputError) as info:
        load_image(path)
    assert "corrupt.png" in str(info.value)


def test_truncated_png(tmp_path):
    path = tmp_path / "truncated.png"
    data = _encoded(_noise(), "PNG")
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="corrupt or truncated"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "truncated.jpg"
    data = _encoded(_noise(), "JPEG", quality=95)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="corrupt or truncated"):
        load_image(path)


def test_truncation_is_not_allowed_globally(tmp_path):
    # Loading must not flip Pillow's global switch that turns truncation into silently grey pixels.
    from PIL import ImageFile

    path = tmp_path / "truncated.jpg"
    data = _encoded(_noise(), "JPEG")
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError):
        load_image(path)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_header_claiming_huge_size_is_refused_quickly(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming_size(100_000, 100_000))
    start = time.perf_counter()
    with pytest.raises(BadInputError) as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0
    assert str(MAX_PIXELS) in str(info.value)
    assert "bomb.png" in str(info.value)


def test_header_over_limit_is_refused_before_decoding(tmp_path):
    # 5000x5000 is under Pillow's own limit, so only our header check can refuse it; decoding the 1-pixel IDAT
    # would instead fail as "truncated", so the message proves nothing was decoded.
    path = tmp_path / "big.png"
    path.write_bytes(_png_claiming_size(5000, 5000))
    with pytest.raises(BadInputError, match=f"5000x5000 = 25000000 pixels, more than the limit of {MAX_PIXELS}"):
        load_image(path)


def test_custom_pixel_limit(tmp_path):
    path = tmp_path / "small.png"
    _noise(20, 20).save(path)
    with pytest.raises(BadInputError, match="limit of 399 pixels"):
        load_image(path, max_pixels=399)
    assert load_image(path, max_pixels=400).size == (20, 20)


# ----------------------------------------------------------------------------------------------------
# load_image: modes, EXIF, sizes
# ----------------------------------------------------------------------------------------------------


def test_rgb_png_round_trips_exactly(tmp_path):
    path = tmp_path / "rgb.png"
    image = _noise()
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    np.testing.assert_array_equal(_rgb(loaded), np.asarray(image))


def _palette_image(transparency: int | None) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (2, 1), 77), [[77, 77, 77], [77, 77, 77]]),
        (Image.new("LA", (2, 1), (77, 0)), [[77, 77, 77], [77, 77, 77]]),
        (_palette_image(None), [[10, 20, 30], [200, 100, 50]]),
        (_palette_image(0), [[10, 20, 30], [200, 100, 50]]),
        # Alpha is dropped, not composited: a fully transparent pixel keeps its colour (diffusers' load_image does so).
        (Image.new("RGBA", (2, 1), (10, 20, 30, 0)), [[10, 20, 30], [10, 20, 30]]),
        (Image.frombytes("1", (2, 1), bytes([0b01000000])), [[0, 0, 0], [255, 255, 255]]),
    ],
    ids=["L", "LA", "P", "P-transparency", "RGBA", "1"],
)
def test_png_modes_load_as_rgb(tmp_path, image, expected):
    path = tmp_path / "mode.png"
    image.save(path)
    loaded = load_image(path)
    np.testing.assert_array_equal(_rgb(loaded), np.array([expected], dtype=np.uint8))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)).save(path)
    loaded = load_image(path)
    np.testing.assert_array_equal(_rgb(loaded)[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(_rgb(loaded)[..., 0], _rgb(loaded)[..., 2])


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[0, 32768, 65535]], dtype=">u2"), [0, 128, 255]),  # I;16B
        (np.array([[-5, 32768, 65535, 70000]], dtype=np.int32), [0, 128, 255, 255]),  # I
        (np.array([[-1.0, 127.6, 255.0, 300.0, np.nan]], dtype=np.float32), [0, 128, 255, 255, 0]),  # F
    ],
    ids=["I;16B", "I", "F"],
)
def test_high_bit_depth_pil_modes(array, expected):
    image = Image.fromarray(array)
    assert image.mode in ("I;16B", "I", "F")
    loaded = load_image_or_pil(image)
    np.testing.assert_array_equal(_rgb(loaded)[0, :, 1], expected)


def test_cmyk_image():
    image = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))
    loaded = load_image_or_pil(image)
    np.testing.assert_array_equal(_rgb(loaded), [[[255, 255, 255], [0, 255, 255]]])


def test_cmyk_jpeg_file(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path, quality=100)
    assert np.abs(_rgb(load_image(path)).astype(int) - 255).max() <= 2


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    # 4x2 blocks of 8x8 pixels (whole JPEG blocks, so compression cannot smear the colours); top-left block red.
    image = Image.new("RGB", (32, 16), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / f"rotated{suffix}"
    image.save(path, exif=exif, quality=100, subsampling=0)
    loaded = load_image(path)
    assert loaded.size == (16, 32)
    # Rotating clockwise moves the top-left block to the top-right.
    red = _rgb(loaded)[..., 0].astype(int)
    assert red[1:7, 9:15].min() > 240 and red[1:7, 1:7].max() < 15


def test_one_pixel_image_loads_and_gets_a_valid_model_size(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    loaded = load_image(path)
    assert loaded.size == (1, 1)
    np.testing.assert_array_equal(_rgb(loaded), [[[1, 2, 3]]])
    w, h = model_size(*loaded.size)
    assert (w, h) == (64, 64)


def test_loaded_image_is_detached_from_file(tmp_path):
    path = tmp_path / "detached.png"
    _noise().save(path)
    loaded = load_image(path)
    os.remove(path)
    assert loaded.getpixel((0, 0)) == _noise().getpixel((0, 0))


def test_load_image_or_pil_does_not_modify_input():
    image = Image.new("RGBA", (3, 3), (1, 2, 3, 4))
    result = load_image_or_pil(image)
    assert image.mode == "RGBA" and result.mode == "RGB" and result is not image


def test_load_image_or_pil_applies_size_limit():
    with pytest.raises(BadInputError, match="limit of 99 pixels"):
        load_image_or_pil(Image.new("RGB", (10, 10)), max_pixels=99)


def test_load_image_or_pil_rejects_other_types():
    with pytest.raises(BadInputError, match="ndarray"):
        load_image_or_pil(np.zeros((2, 2, 3), dtype=np.uint8))


def test_load_image_or_pil_accepts_paths(tmp_path):
    path = tmp_path / "p.png"
    _noise().save(path)
    assert load_image_or_pil(str(path)).size == load_image_or_pil(path).size == (32, 24)


# ----------------------------------------------------------------------------------------------------
# list_images
# ----------------------------------------------------------------------------------------------------


def test_list_images_sorts_and_ignores_non_images(tmp_path, caplog):
    for name in ["b.png", "a.JPG", "c.webp", "d.jpeg", "e.bmp", "notes.txt", "f.png.bak", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "g.GIF").write_bytes(b"x")
    (tmp_path / "h.tiff").write_bytes(b"x")
    top = ["a.JPG", "b.png", "c.webp", "d.jpeg", "e.bmp", "g.GIF", "h.tiff"]
    assert [p.name for p in list_images(tmp_path)] == top
    nested = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert nested == [*top, "sub/inner.png"]
    assert [p.name for p in list_images(tmp_path, recursive=True, skip=[tmp_path / "sub"])] == top
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")  # a broken link is said, not silently left out
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        assert [p.name for p in list_images(tmp_path)] == top
    assert "skipped 1 link(s) to missing files, e.g. " + str(tmp_path / "gone.png") in caplog.text


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_list_images_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(BadInputError, match="holds no images") as info:
        list_images(tmp_path)
    assert all(ext in str(info.value) for ext in IMAGE_EXTENSIONS)


def test_list_images_given_a_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"x")
    with pytest.raises(BadInputError, match="not a folder"):
        list_images(path)


# ----------------------------------------------------------------------------------------------------
# model_size
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "kwargs", "expected"),
    [
        ((512, 512), {}, (512, 512)),
        ((515, 517), {}, (512, 520)),  # nearest multiple of 8, half up
        ((1, 1), {}, (64, 64)),
        ((100, 1), {}, (6400, 64)),  # aspect ratio kept while scaling up
        ((30, 1000), {}, (64, 2136)),  # 1000 * 64 / 30 = 2133.3 -> 2136
        ((59, 100), {"min_side": 59}, (64, 104)),  # 59 would round to 56 < min_side, so it rounds up
        ((100, 3), {"multiple": 64, "min_side": 1}, (128, 64)),  # never below one multiple
    ],
)
def test_model_size(size, kwargs, expected):
    assert model_size(*size, **kwargs) == expected


def test_model_size_results_are_valid_for_many_sizes():
    for width in (1, 2, 7, 63, 64, 65, 333, 1023):
        for height in (1, 5, 64, 100, 777):
            w, h = model_size(width, height)
            assert w % 8 == 0 and h % 8 == 0 and min(w, h) >= 64


@pytest.mark.parametrize("args", [(0, 10), (10, -1), (10, 10, 0), (10, 10, 8, 0), (1.5, 10), (True, 10)])
def test_model_size_rejects_bad_arguments(args):
    with pytest.raises(BadInputError):
        model_size(*args)


# ----------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------


def test_pil_to_tensor_shape_and_range():
    images = [Image.new("RGB", (5, 3), (0, 255, 51)), Image.new("L", (5, 3), 255)]
    batch = pil_to_tensor(images)
    assert batch.shape == (2, 3, 3, 5) and batch.dtype == torch.float32
    assert torch.allclose(batch[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.2]))
    assert torch.all(batch[1] == 1.0)
    signed = pil_to_tensor(images, value_range=(-1.0, 1.0))
    assert torch.allclose(signed[0, :, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))


def test_pil_to_tensor_rejects_mixed_sizes():
    with pytest.raises(BadInputError, match="4x4"):
        pil_to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))])


@pytest.mark.parametrize("bad", [[], "image.png", [np.zeros((2, 2, 3))]])
def test_pil_to_tensor_rejects_non_images(bad):
    with pytest.raises(BadInputError):
        pil_to_tensor(bad)


def test_pil_to_tensor_rejects_empty_range():
    with pytest.raises(BadInputError, match="low < high"):
        pil_to_tensor([Image.new("RGB", (2, 2))], value_range=(1.0, 1.0))


def test_tensor_round_trip_is_exact():
    images = [_noise(17, 9, seed=1), _noise(17, 9, seed=2)]
    back = tensor_to_pil(pil_to_tensor(images, value_range=(-1.0, 1.0)))
    assert len(back) == 2
    for original, result in zip(images, back, strict=True):
        np.testing.assert_array_equal(_rgb(result), np.asarray(original))


def test_all_byte_values_round_trip():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([values] * 3, axis=2), mode="RGB")
    (back,) = tensor_to_pil(pil_to_tensor([image], value_range=(-1.0, 1.0)))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(image))


def test_tensor_to_pil_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.0, float("nan")]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    (image,) = tensor_to_pil(x.to(torch.bfloat16))
    np.testing.assert_array_equal(_rgb(image)[0, :, 0], [0, 0, 191, 255, 255, 128])


def test_tensor_to_pil_accepts_single_image_and_rejects_bad_shapes():
    assert len(tensor_to_pil(torch.zeros(3, 4, 5))) == 1
    with pytest.raises(BadInputError, match="shape"):
        tensor_to_pil(torch.zeros(1, 4, 4, 4))


# ----------------------------------------------------------------------------------------------------
# Conditioning images
# ----------------------------------------------------------------------------------------------------


def test_canny_finds_only_the_square_border():
    array = np.zeros((64, 64), dtype=np.uint8)
    array[20:44, 20:44] = 255
    edges = _rgb(canny(Image.fromarray(array)))
    assert edges.shape == (64, 64, 3)
    assert set(np.unique(edges)) <= {0, 255}
    mask = edges[..., 0] == 255
    assert mask.any()
    np.testing.assert_array_equal(edges[..., 0], edges[..., 2])
    ys, xs = np.nonzero(mask)
    # Every edge pixel lies on (within one pixel of) the square's outline ...
    near_outline = (np.minimum(np.abs(ys - 20), np.abs(ys - 43)) <= 1) | (
        np.minimum(np.abs(xs - 20), np.abs(xs - 43)) <= 1
    )
    assert near_outline.all()
    assert ys.min() >= 19 and ys.max() <= 44 and xs.min() >= 19 and xs.max() <= 44
    # ... and the outline is there on all four sides, while the flat inside stays black.
    assert mask[19:21, 30].any() and mask[43:45, 30].any() and mask[30, 19:21].any() and mask[30, 43:45].any()
    assert not mask[23:41, 23:41].any()


@pytest.mark.parametrize(("low", "high"), [(-1, 100), (200, 100), (0, 256), ("10", 20), (float("nan"), 20)])
def test_canny_rejects_bad_thresholds(low, high):
    with pytest.raises(BadInputError, match="0 <= low <= high <= 255"):
        canny(Image.new("RGB", (8, 8)), low, high)


def test_canny_on_flat_image_is_black():
    assert not _rgb(canny(Image.new("RGB", (16, 16), (90, 10, 200)))).any()


def test_sketch_turns_dark_strokes_white():
    page = np.full((10, 10, 3), 240, dtype=np.uint8)
    page[5, :] = (20, 20, 20)  # a dark horizontal stroke
    page[2, 2] = (128, 128, 128)  # mid grey: 128 / 255 >= 0.5, so it counts as page
    result = _rgb(sketch(Image.fromarray(page))).copy()
    assert result.shape == (10, 10, 3)
    assert (result[5] == 255).all()
    result[5] = 0
    assert not result.any()


def test_sketch_threshold():
    image = Image.new("L", (1, 1), 100)  # 100 / 255 = 0.39
    assert _rgb(sketch(image, threshold=0.4))[0, 0, 0] == 255
    assert _rgb(sketch(image, threshold=0.3))[0, 0, 0] == 0
    with pytest.raises(BadInputError, match=r"\[0, 1\]"):
        sketch(image, threshold=1.5)


def test_conditioning_accepts_a_path(tmp_path):
    path = tmp_path / "page.png"
    Image.new("RGB", (8, 8), (255, 255, 255)).save(path)
    assert not _rgb(sketch(path)).any()
    assert canny(path).size == (8, 8)


# ----------------------------------------------------------------------------------------------------
# save_image
# ----------------------------------------------------------------------------------------------------


def test_save_image_round_trip_and_creates_folders(tmp_path):
    path = tmp_path / "out" / "deeper" / "result.png"
    image = _noise()
    assert save_image(image, path) == path
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.png"]


def test_save_image_writes_a_name_as_long_as_the_file_system_allows(tmp_path):
    name = "\u65e5" * 80 + ".png"  # 244 bytes: its temporary file's name used to pass the 255-byte limit
    save_image(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_save_image_refuses_existing_file(tmp_path):
    path = tmp_path / "result.png"
    path.write_bytes(b"precious")
    with pytest.raises(BadInputError, match="--overwrite") as info:
        save_image(_noise(), path)
    assert "result.png" in str(info.value)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]


def test_save_image_overwrites_when_asked(tmp_path):
    path = tmp_path / "result.png"
    path.write_bytes(b"old")
    save_image(_noise(), path, overwrite=True)
    assert load_image(path).size == (32, 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]


@pytest.mark.parametrize(
    "code, kind",
    [
        (errno.ENOSPC, TurboI2IError),
        (errno.EDQUOT, TurboI2IError),
        (errno.EIO, TurboI2IError),
        (errno.EACCES, BadInputError),
    ],
)
def test_save_image_failure_leaves_no_partial_or_temp_file(tmp_path, monkeypatch, code, kind):
    # the README's exit codes: a full disk is a failure of the machine (1), a folder one may not write to bad input (2)
    path = tmp_path / "result.png"
    path.write_bytes(b"old")

    def crash(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(preprocess.os, "replace", crash)
    with pytest.raises(TurboI2IError, match=os.strerror(code)) as error:
        save_image(_noise(), path, overwrite=True)
    assert type(error.value) is kind
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]


@pytest.mark.parametrize("suffix", [".jpg", ".JPEG", ".bmp", ".webp"])
def test_save_image_formats_from_extension(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    save_image(Image.new("RGBA", (8, 8), (200, 100, 50, 255)), path)
    expected = {".jpg": "JPEG", ".JPEG": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}[suffix]
    with Image.open(path) as written:
        assert written.format == expected
    assert np.abs(_rgb(load_image(path)).astype(int) - [200, 100, 50]).max() <= 3


@pytest.mark.parametrize("name", ["out.gif", "out.tiff", "out"])
def test_save_image_rejects_unknown_extension(tmp_path, name):
    with pytest.raises(BadInputError, match="unknown extension"):
        save_image(_noise(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_save_image_to_a_folder_path(tmp_path):
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(BadInputError, match="folder"):
        save_image(_noise(), tmp_path / "taken.png", overwrite=True)


def test_saved_file_is_not_private(tmp_path):
    # Temporary-file helpers create 0600 files; the final image must get the usual umask-based permissions.
    path = tmp_path / "shared.png"
    save_image(_noise(), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_model_size_refuses_extreme_strips():
    with pytest.raises(BadInputError, match="aspect ratio"):
        model_size(1, 10000)
    assert model_size(1, 100) == (64, 6400)


def test_conversions_run_where_the_tensor_is_and_take_half_precision():
    images = [Image.effect_noise((16, 8), 64).convert("RGB") for _ in range(2)]
    on_device = pil_to_tensor(images, (-1.0, 1.0), torch.device("cpu"))
    assert torch.equal(on_device, pil_to_tensor(images, value_range=(-1.0, 1.0)))
    # the pipeline hands bf16 model outputs over as they are: the same pictures as their fp32 values give
    half = (on_device * 1.01).to(torch.bfloat16)
    for a, b in zip(tensor_to_pil(half), tensor_to_pil(half.float())):
        assert a.tobytes() == b.tobytes()


def test_list_images_reads_linked_folders_by_their_real_path_and_skips_unreadable_ones(tmp_path, caplog, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "1.png").write_bytes(b"x")
    (tmp_path / "aa").symlink_to(tmp_path / "real")  # listed before real/ by name: its files were read as aa/1.png
    (tmp_path / "zz").symlink_to(tmp_path / "real")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "2.png").write_bytes(b"x")
    (tmp_path / ".#photo.png").symlink_to(tmp_path / "gone.png")  # an editor's lock link: hidden, not warned about
    real_iterdir = pathlib.Path.iterdir

    def iterdir(self):  # the tests run as root, for whom permissions do not stop a listing
        if self.name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        found = list_images(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["real/1.png"]  # the rest of the tree goes on
    assert f"skipped 1 unreadable folder(s) or file(s), e.g. {tmp_path / 'locked'}" in caplog.text
    assert "link(s) to missing files" not in caplog.text
    with pytest.raises(BadInputError, match="cannot be listed \\(Permission denied\\); check its rights"):
        list_images(tmp_path / "locked")  # the folder asked for itself is still an error
