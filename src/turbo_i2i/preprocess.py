"""Image I/O and preprocessing: load any picture as RGB, size it for the model, turn it into tensors and back.

Every failure a user can cause (a missing, corrupt, truncated or oversized file, a bad threshold, an existing output
file) is raised as :class:`~turbo_i2i.errors.BadInputError` with a one-sentence message naming the file and the fix,
never as a PIL or OS traceback.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import BadInputError, TurboI2IError

logger = logging.getLogger("turbo_i2i")

# What save_image writes (by extension), and what a folder is searched for: those and the other formats read.
SAVE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGE_EXTENSIONS = (*SAVE_EXTENSIONS, ".gif", ".tif", ".tiff")
MAX_PIXELS = 4096 * 4096
# every image runs at 64 x 64 or more (``model_size``), so a pixel limit below this cannot refuse small pictures
MIN_RUN_PIXELS = 64 * 64
# The decoders a file may reach, whatever its name. Pillow would otherwise try every plugin it has, some of which hand
# the data to external programs (EPS runs Ghostscript) or parse rarely used formats; pictures come in these.
READ_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG includes multi-picture (MPO) files

# Pillow format names for the extensions save_image writes; reading accepts whatever Pillow can identify.
_SAVE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
# Pillow's default JPEG/WebP quality (75) visibly blurs model outputs; 95 keeps them close to lossless.
_LOSSY_QUALITY = 95
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image file into memory as an RGB picture, upright as its EXIF orientation says.

    The size is checked from the header before any pixel is decoded, so a small file that claims a huge size (a
    decompression bomb) is refused without allocating memory; so is a strip whose model size (see
    :func:`model_size`) would exceed ``max_pixels``. Truncated files fail instead of returning a partly
    grey picture.

    Only the formats in ``READ_FORMATS`` are decoded (PNG, JPEG, WebP, BMP, GIF, TIFF), whatever the file is
    called. Of an animated GIF or WebP the first frame is used, with a warning on the ``turbo_i2i`` logger.

    Args:
        path: the image file.
        max_pixels: the most pixels (width * height) accepted.

    Returns:
        A fully loaded ``PIL.Image.Image`` in mode "RGB", detached from the file.

    Raises:
        BadInputError: the file is missing, a folder, not an image, corrupt, truncated or too large.
    """
    path = Path(path)
    _check_is_file(path)
    try:
        # PIL warns (DecompressionBombWarning) above its own global limit; max_pixels is checked explicitly below,
        # so the caller's limit, not PIL's global one, decides.
        Image.init()  # registers every plugin: open(formats=...) looks each named one up (TIFF, WebP load lazily)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=READ_FORMATS) as image:
                check_size(image.size, max_pixels, f"Image '{path}'")
                _note_animation(image, f"Image '{path}'")
                image.load()
                return to_rgb(_upright(image, path), path)
    except (BadInputError, MemoryError):
        # MemoryError is the machine's limit, not a damaged file: do not report it as "corrupt".
        raise
    except Image.DecompressionBombError as exc:
        # Raised by Image.open itself, before our check, when the header exceeds Pillow's global hard limit.
        # Pillow refuses above twice its MAX_IMAGE_PIXELS, whatever max_pixels allows: name the limit that was hit.
        pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        limit = min(max_pixels, pillow_limit) if pillow_limit else max_pixels
        source = "" if limit == max_pixels else ", the most Pillow decodes"
        raise BadInputError(
            f"Image '{path}' is too large to load safely (its header claims more than {limit} pixels{source});"
            " downscale it."
        ) from exc
    except Image.UnidentifiedImageError as exc:
        if path.stat().st_size == 0:
            raise BadInputError(f"Image '{path}' is empty (0 bytes); re-export or re-download it.") from exc
        if is_image_name(path):  # the right ending: damaged (cut off in its header), or another kind of file
            raise BadInputError(
                f"Image '{path}' cannot be decoded: it is damaged (cut off early, say) or not really a"
                f" {path.suffix.lstrip('.').upper()} file (turbo-i2i reads PNG, JPEG, WebP, BMP, GIF and TIFF);"
                " re-export or re-download it."
            ) from exc
        raise BadInputError(
            f"'{path}' is not an image turbo-i2i reads (PNG, JPEG, WebP, BMP, GIF or TIFF); use one of"
            f" {', '.join(IMAGE_EXTENSIONS)}."
        ) from exc
    except PermissionError as exc:
        raise BadInputError(f"Image '{path}' cannot be read (permission denied); check its permissions.") from exc
    except Exception as exc:
        # Pillow's decoders report damaged data with many exception types (OSError, SyntaxError, struct.error,
        # ValueError, EOFError, ...); all of them mean the same thing to the user.
        raise BadInputError(
            f"Image '{path}' is corrupt or truncated ({type(exc).__name__}: {exc}); re-export or re-download it."
        ) from exc


def load_image_or_pil(image: str | os.PathLike | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Accept a file path or an in-memory PIL image and return an RGB picture by the same rules as :func:`load_image`.

    Args:
        image: a path (str or os.PathLike) or a ``PIL.Image.Image``; the PIL image is not modified.
        max_pixels: the most pixels (width * height) accepted.

    Returns:
        A new RGB ``PIL.Image.Image``.

    Raises:
        BadInputError: the path is bad (see :func:`load_image`), the image is too large or cannot be decoded, or
            ``image`` is neither a path nor a PIL image.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels=max_pixels)
    if not isinstance(image, Image.Image):
        raise BadInputError(f"Expected an image path or a PIL image, got a {type(image).__name__}; pass one of those.")
    name = _describe(image)
    check_size(image.size, max_pixels, name)
    _note_animation(image, name)
    try:
        # An image straight from Image.open is still lazy; a truncated file only fails here.
        image.load()
    except Exception as exc:
        raise BadInputError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc}); reload it.") from exc
    # exif_transpose returns a copy, so the caller's image is never rotated or converted in place.
    return to_rgb(_upright(image, name), name)


def is_image_name(path: Path) -> bool:
    """Whether a name is a picture's: its extension is in ``IMAGE_EXTENSIONS`` (any letter case) and it is not hidden
    (a name starting with "." is usually metadata, such as macOS ``._photo.jpg`` resource forks, not a picture)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """Whether a folder entry is an image to translate or train on: a file (or a link to one) with a picture's name
    (``is_image_name``)."""
    return is_image_name(path) and path.is_file()


def list_images(
    folder: str | os.PathLike, recursive: bool = False, skip: Sequence[str | os.PathLike] = ()
) -> list[Path]:
    """List the image files inside a folder, sorted by path.

    Hidden files and folders are skipped (see :func:`is_image_name`); links to files and folders are followed (each
    folder is read once, under its real path where the tree holds it, so a link to a folder above cannot loop).
    Sub-folders that cannot be read are skipped with a warning, as are links to missing pictures.

    Args:
        folder: the folder to list.
        recursive: search sub-folders too.
        skip: folders not to search (an output folder inside the input folder, say).

    Returns:
        Sorted paths (under ``folder``) of the files whose extension is in ``IMAGE_EXTENSIONS`` (any letter case).

    Raises:
        BadInputError: the folder does not exist, is a file, cannot be read, or holds no image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise BadInputError(f"Folder '{folder}' does not exist; check the path.")
    if not folder.is_dir():
        raise BadInputError(f"'{folder}' is a file, not a folder; pass the folder that holds the images.")
    images: list[Path] = []
    broken: list[Path] = []  # links to pictures that are gone: said, since the user expects them to be read
    unreadable: list[Path] = []  # sub-folders and entries the user may not read: said, the rest goes on
    seen = {Path(s).resolve() for s in skip}
    # Real folders first, in name order, then linked ones: a folder reached both ways is read under its real path,
    # whatever order the file system lists entries in.
    pending, linked = deque([folder]), []
    while pending or linked:
        if not pending:
            pending.extend(sorted(linked))
            linked.clear()
        current = pending.popleft()
        if current.resolve() in seen:
            continue
        seen.add(current.resolve())
        try:
            entries = sorted(current.iterdir())
        except OSError as exc:
            if current == folder:
                raise BadInputError(f"Folder '{folder}' cannot be listed ({exc.strerror}); check its rights.") from exc
            unreadable.append(current)
            continue
        for path in entries:
            try:
                if recursive and path.is_dir() and not path.name.startswith("."):
                    (linked if path.is_symlink() else pending).append(path)
                elif is_image_file(path):
                    images.append(path)
                elif path.is_symlink() and not path.exists() and is_image_name(path):
                    broken.append(path)
            except OSError:  # a folder that may be listed but not searched
                unreadable.append(path)
    if broken:
        logger.warning("skipped %d link(s) to missing files, e.g. %s", len(broken), min(broken))
    if unreadable:
        logger.warning("skipped %d unreadable folder(s) or file(s), e.g. %s", len(unreadable), min(unreadable))
    if not images:
        where = " (sub-folders too)" if recursive else ""
        raise BadInputError(
            f"Folder '{folder}' holds no images{where}; expected files ending in {', '.join(IMAGE_EXTENSIONS)}."
        )
    return sorted(images)


# ----------------------------------------------------------------------------------------------------
# Sizes and tensors
# ----------------------------------------------------------------------------------------------------


def model_size(
    width: int, height: int, multiple: int = 8, min_side: int = 64, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """The size the model runs at for an image of ``width`` x ``height``.

    The VAE downsamples by 8, so each side must be a multiple of 8. Tiny images (down to 1x1) are first scaled up,
    keeping the aspect ratio, until the shorter side is ``min_side``; then each side is rounded to the nearest
    multiple of ``multiple`` (never below ``multiple``, and never below ``min_side`` where rounding down would cross
    it).

    Args:
        width: the image width in pixels (> 0).
        height: the image height in pixels (> 0).
        multiple: each side of the result is a multiple of this (>= 1).
        min_side: the shorter side of the result is at least this (>= 1).
        max_pixels: the result may not exceed this many pixels (a 1 x 10000 strip would otherwise become 64 x 640000).

    Returns:
        ``(width, height)`` to resize the image to before it enters the model.

    Raises:
        BadInputError: a size or parameter is not a positive integer, or the result would exceed ``max_pixels``.
    """
    for name, value in (("width", width), ("height", height), ("multiple", multiple), ("min_side", min_side)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise BadInputError(f"model_size: {name} must be a positive integer, got {value!r}.")
    w, h = float(width), float(height)
    shorter = min(w, h)
    if shorter < min_side:
        # Set the shorter side exactly (not via a float scale) so 63.9999 never rounds below min_side.
        scale = min_side / shorter
        w, h = (float(min_side), h * scale) if w <= h else (w * scale, float(min_side))
    size = _round_side(w, multiple, min_side), _round_side(h, multiple, min_side)
    if size[0] * size[1] > max_pixels:
        raise BadInputError(
            f"A {width}x{height} image would run at {size[0]}x{size[1]}, over the limit of {max_pixels} pixels;"
            f" its aspect ratio is too extreme. Crop or pad it first."
        )
    return size


def pil_to_tensor(
    images: Sequence[Image.Image], value_range: tuple[float, float] = (0.0, 1.0), device: torch.device | None = None
) -> torch.Tensor:
    """Stack same-size pictures into a float batch for the model.

    Args:
        images: PIL images, all the same size; non-RGB modes are converted by the rules of :func:`load_image`.
        value_range: ``(low, high)`` that pixel values 0 and 255 map to, e.g. ``(-1.0, 1.0)`` for a VAE input.
        device: where the batch goes (the CPU when None). The bytes are moved first and scaled there, so a GPU
            receives a quarter of the data and does the float work itself.

    Returns:
        A float32 tensor of shape (N, 3, H, W) on ``device``.

    Raises:
        BadInputError: the list is empty, holds a non-image, the images differ in size, or the range is empty.
    """
    if isinstance(images, Image.Image) or not isinstance(images, Sequence) or len(images) == 0:
        raise BadInputError("pil_to_tensor needs a non-empty list of PIL images.")
    low, high = (float(v) for v in value_range)
    if not low < high:
        raise BadInputError(f"pil_to_tensor: value_range must be (low, high) with low < high, got {value_range}.")
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise BadInputError(f"pil_to_tensor: item {i} is a {type(image).__name__}, not a PIL image.")
        if image.size != images[0].size:
            raise BadInputError(
                f"pil_to_tensor: image {i} is {image.width}x{image.height} but image 0 is "
                f"{images[0].width}x{images[0].height}; resize them to one size to batch them."
            )
        arrays.append(np.asarray(to_rgb(image, f"Image {i}") if image.mode != "RGB" else image, dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).to(torch.float32)
    return (batch / 255.0 * (high - low) + low).contiguous()


def tensor_to_pil(tensor: torch.Tensor) -> list[Image.Image]:
    """Turn model output in [-1, 1] into RGB pictures.

    Values are clamped to [-1, 1] (NaN becomes 0, i.e. mid grey) and mapped with ``round(x * 127.5 + 127.5)``;
    rounding rather than truncating makes ``pil_to_tensor(..., (-1, 1))`` followed by this exact.

    Args:
        tensor: shape (N, 3, H, W) or (3, H, W), any float dtype and device.

    Returns:
        One RGB ``PIL.Image.Image`` per batch item.

    Raises:
        BadInputError: the tensor does not have 3 channels in dimension -3.
    """
    if not isinstance(tensor, torch.Tensor):
        raise BadInputError(f"tensor_to_pil expects a torch tensor, got a {type(tensor).__name__}.")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[1] != 3:
        raise BadInputError(f"tensor_to_pil expects shape (N, 3, H, W) or (3, H, W), got {tuple(tensor.shape)}.")
    # rounded to bytes where the tensor is: a GPU sends a quarter of the data and the CPU does no float work
    x = torch.nan_to_num(tensor.detach().float(), nan=0.0).clamp(-1.0, 1.0)
    pixels = (x * 127.5 + 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p), mode="RGB") for p in pixels]


# ----------------------------------------------------------------------------------------------------
# Conditioning images
# ----------------------------------------------------------------------------------------------------


def check_canny_thresholds(low_threshold: object, high_threshold: object) -> None:
    """Refuse Canny thresholds that are not numbers with 0 <= low <= high <= 255.

    Args:
        low_threshold, high_threshold: the hysteresis thresholds (0-255 gradient scale).

    Raises:
        BadInputError: naming both.
    """
    if not (_is_number(low_threshold) and _is_number(high_threshold) and 0 <= low_threshold <= high_threshold <= 255):
        raise BadInputError(
            "Canny thresholds must satisfy 0 <= low <= high <= 255, "
            f"got low={low_threshold!r}, high={high_threshold!r}."
        )


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edge map: white (255) edges on black, the input of the edge_to_image model.

    Edges are found on the RGB image (OpenCV takes the strongest channel gradient), as the official edge_to_image
    model's inputs were, so edges between colours of equal brightness are kept. The thresholds compare against the
    gradient magnitude (0-255 scale): pixels above ``high_threshold`` are edges; pixels between the two are kept
    only where connected to such an edge (hysteresis). Lower values give more, noisier edges; 100/200 are the
    pix2pix-Turbo defaults.

    Args:
        image: a PIL image (used as is, converted to RGB) or an image path (read with :func:`load_image`).
        low_threshold: hysteresis lower threshold, 0 <= low <= high.
        high_threshold: hysteresis upper threshold, low <= high <= 255.

    Returns:
        An RGB ``PIL.Image.Image`` of the same size, every pixel (0, 0, 0) or (255, 255, 255).

    Raises:
        BadInputError: the thresholds are out of range or in the wrong order.
    """
    check_canny_thresholds(low_threshold, high_threshold)
    edges = cv2.Canny(np.ascontiguousarray(np.asarray(_condition_input(image))), low_threshold, high_threshold)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), mode="RGB")


def sketch(image: Image.Image, threshold: float = 0.5) -> Image.Image:
    """Binarise a drawing into the input of the sketch model: white strokes on black.

    Each channel is thresholded on its own, as the official sketch_to_image model's inputs were: a value / 255 below
    ``threshold`` (dark) becomes 255, others 0, so a dark pen drawing on paper becomes white strokes on black.

    Args:
        image: a PIL image (used as is, converted to RGB) or an image path (read with :func:`load_image`).
        threshold: darkness cut-off in [0, 1].

    Returns:
        An RGB ``PIL.Image.Image`` of the same size, every channel 0 or 255.

    Raises:
        BadInputError: the threshold is not a number in [0, 1].
    """
    if not (_is_number(threshold) and 0 <= threshold <= 1):
        raise BadInputError(f"Sketch threshold must be a number in [0, 1], got {threshold!r}.")
    rgb = np.asarray(_condition_input(image), dtype=np.float32) / 255.0
    return Image.fromarray(np.where(rgb < threshold, 255, 0).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------


def save_image(image: Image.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a picture atomically: a crash or a full disk never leaves a half-written file at ``path``.

    The image is written to a hidden temporary file in the same folder (same filesystem, so the rename is atomic),
    flushed to disk, then moved over ``path`` with ``os.replace``. Parent folders are created.

    Args:
        image: the PIL image to write.
        path: the output file; its extension (one of ``SAVE_EXTENSIONS``) picks the format.
        overwrite: replace an existing file instead of refusing.

    Returns:
        The path written.

    Raises:
        BadInputError: the extension is unknown, the file exists and ``overwrite`` is False, the path is a folder,
            or the file cannot be written there.
        TurboI2IError: the disk is full, a quota is reached, or an I/O error.
    """
    path = Path(path)
    if not isinstance(image, Image.Image):
        raise BadInputError(f"Cannot save a {type(image).__name__} to '{path}'; expected a PIL image.")
    fmt = _SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BadInputError(
            f"Cannot save '{path}': unknown extension {path.suffix!r}; use one of {', '.join(SAVE_EXTENSIONS)}."
        )
    if path.is_dir():
        raise BadInputError(f"Cannot save to '{path}': it is a folder; give a file name.")
    # Checked before writing so an existing file is never touched; a file appearing in between is still replaced.
    if path.exists() and not overwrite:
        raise BadInputError(f"'{path}' already exists; pass --overwrite to replace it or choose another name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(_savable(image, fmt), path, fmt)
    except OSError as exc:
        # A full disk, a quota or an I/O error is the machine's failure (exit 1, and a folder run stops there: the
        # next file would fail alike); anything else (permissions, a name too long) is the path's (exit 2).
        kind = TurboI2IError if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else BadInputError
        raise kind(f"Cannot write '{path}' ({exc.strerror or exc}); check the folder and free space.") from exc
    return path


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _check_is_file(path: Path) -> None:
    """Raise BadInputError unless ``path`` names an existing regular file."""
    if not path.exists():
        raise BadInputError(f"Image file '{path}' does not exist; check the path.")
    if path.is_dir():
        raise BadInputError(f"'{path}' is a folder, not an image file; pass a file (or use the folder option).")


def check_size(size: tuple[int, int], max_pixels: float, name: str) -> None:
    """Refuse empty images and images with more than ``max_pixels`` pixels, using the size alone.

    The size the model would run at counts too: a tiny file holding a 1 x 4000 strip is scaled up to 64 x 256000,
    so without this check a few bytes could demand gigabytes of model memory (a decompression bomb one step later).

    Args:
        size: (width, height).
        max_pixels: the most pixels accepted (``math.inf``: any number).
        name: how the message names the image.

    Raises:
        BadInputError: naming the image, its size and the limit.
    """
    width, height = size
    if width < 1 or height < 1:
        raise BadInputError(f"{name} is {width}x{height} and has no pixels; use a non-empty image.")
    if width * height > max_pixels:
        raise BadInputError(
            f"{name} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels} pixels; "
            "downscale it or raise the limit (max_pixels)."
        )
    if math.isfinite(max_pixels):
        try:
            model_size(width, height, max_pixels=max(int(max_pixels), MIN_RUN_PIXELS))
        except BadInputError as exc:
            raise BadInputError(f"{name}: {exc}") from None


def _note_animation(image: Image.Image, name: str) -> None:
    """Warn that only the current (first) frame of an animated image is used."""
    try:
        animated = bool(getattr(image, "is_animated", False))
    except Exception:  # counting frames reads the file; a damaged one fails later, in load(), with its own message
        animated = False
    if animated:
        logger.warning("%s is animated; only its first frame is used.", name)


def _is_number(value: object) -> bool:
    """True for real numbers (int, float, numpy scalars), False for bools, NaN and everything else."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and not math.isnan(value)


def _condition_input(image: str | os.PathLike | Image.Image) -> Image.Image:
    """RGB input for canny/sketch: a path is loaded (EXIF applied), a PIL image keeps its exact pixel grid.

    A PIL image is not EXIF-rotated here so the condition map stays aligned with the picture the caller holds.
    """
    if isinstance(image, Image.Image):
        check_size(image.size, math.inf, _describe(image))
        return to_rgb(image, _describe(image))
    return load_image_or_pil(image)


def _describe(image: Image.Image) -> str:
    """Name an in-memory image in messages by the file it came from, if known."""
    filename = getattr(image, "filename", "")
    return f"Image '{filename}'" if filename else f"The {image.width}x{image.height} {image.mode} image"


def _upright(image: Image.Image, name: object) -> Image.Image:
    """Apply the EXIF orientation tag (phones store rotated pixels plus a tag); return a new image."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, IndexError) as exc:
        # A damaged EXIF block must not lose the picture; the pixels themselves are fine.
        warnings.warn(f"Ignoring unreadable EXIF orientation of {name}: {exc}", stacklevel=3)
        return image.copy()


def to_rgb(image: Image.Image, name: object = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high-bit-depth data.

    Alpha is dropped, not composited, as ``diffusers.utils.load_image`` does, so a model sees the same input here
    and there.

    Args:
        image: any PIL image (not modified).
        name: how a message names it (default: its file name, or its size and mode).

    Returns:
        a new RGB image; 16-bit and float gray images are scaled to 0..255, not clipped.

    Raises:
        BadInputError: a mode with no way to RGB.
    """
    name = name or _describe(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own convert clips 16-bit values at 255 (a white picture); scale 0..65535 to 0..255 instead.
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return _gray_to_rgb((values * 255 + 32767) // 65535)
    if mode == "F":
        # Pillow's convention for float images is the 0..255 scale of "L" (see Image.convert("F")).
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return _gray_to_rgb(np.rint(np.clip(values, 0.0, 255.0)))
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA keeps the palette colours and avoids Pillow's transparency warning.
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    try:
        # Modes without a direct route to RGB (e.g. "La") usually have one through RGBA.
        return image.convert("RGBA").convert("RGB")
    except ValueError as exc:
        raise BadInputError(
            f"{name} has pixel mode {mode!r}, which cannot be converted to RGB; save it as RGB."
        ) from exc


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    """An RGB image whose three channels are the given 0..255 gray values."""
    gray = values.astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")


def _round_side(side: float, multiple: int, min_side: int) -> int:
    """Round one side to the nearest multiple (half up), never below ``multiple`` nor, if the side reached it,
    below ``min_side``."""
    rounded = max(multiple, math.floor(side / multiple + 0.5) * multiple)
    if rounded < min_side <= side:
        rounded = math.ceil(side / multiple) * multiple
    return int(rounded)


def _savable(image: Image.Image, fmt: str) -> Image.Image:
    """Convert the image to a mode the format can store: RGB or L, plus RGBA where the format keeps alpha."""
    if image.mode in ("RGB", "L") or (image.mode == "RGBA" and fmt in ("PNG", "WEBP")):
        return image
    return to_rgb(image, "The image to save")


def _write_atomically(image: Image.Image, path: Path, fmt: str) -> None:
    """Write to a temporary sibling file, fsync it, then rename it over ``path``; remove the temporary on failure."""
    # A short name: the picture's own may be as long as the file system allows (255 bytes), with nothing to add.
    tmp = path.with_name(f".turbo-i2i-{secrets.token_hex(6)}.tmp")
    options = {"quality": _LOSSY_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    # os.open with mode 0o666 lets the umask set the permissions, as a plain open() would (mkstemp forces 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
