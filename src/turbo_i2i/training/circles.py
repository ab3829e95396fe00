"""The "circles" data set: white shape outlines on black -> the same shapes filled with a prompted colour.

It is the procedural paired data the built-in tiny model is trained on from scratch, and the yardstick it is measured
with. Each sample has 1 to 3 shapes (mostly circles, some squares and triangles), an input with their outlines, a
target with the union of the shapes filled with one palette colour on another, the exact filled mask, and a caption
naming both colours in one of several wordings. Everything is drawn without antialiasing, so the mask is exact and
the target holds exactly two colours.

All randomness comes from ``numpy.random.default_rng(seed)``: the same seed always gives the same samples and
byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import BadInputError
from ..seeds import check_seed

# Canonical name -> RGB. Every pair is more than 100 apart in RGB (Euclidean), so even a tiny model trained for a
# short while can tell them apart and the "closer to fill than to background" rule in the metrics is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (255, 140, 0),
    "golden": (250, 215, 90),
    "green": (30, 170, 40),
    "cyan": (0, 220, 230),
    "blue": (30, 50, 220),
    "purple": (130, 20, 150),
    "pink": (240, 80, 200),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
    "grey": (128, 128, 128),
}

# Canonical name -> the phrasings captions use. Each phrase belongs to one colour only, so parse_prompt can map any
# of them back; a phrase may contain a shorter phrase of the *same* colour ("golden yellow" / "yellow").
WORDINGS: dict[str, list[str]] = {
    "red": ["red", "bright red", "scarlet"],
    "orange": ["orange", "bright orange", "tangerine"],
    "golden": ["light golden", "golden yellow", "golden", "yellow"],
    "green": ["green", "grass green", "leaf green"],
    "cyan": ["cyan", "aqua", "turquoise"],
    "blue": ["blue", "royal blue", "deep blue"],
    "purple": ["purple", "violet", "deep purple"],
    "pink": ["pink", "hot pink", "magenta"],
    "white": ["white", "snow white", "pure white"],
    "black": ["black", "jet black", "pitch black"],
    "grey": ["grey", "gray", "medium grey", "medium gray"],
}

SHAPES = ("circle", "square", "triangle")
# "Mostly circles": circles are the core task, the polygons keep the model from assuming every outline is round.
SHAPE_PROBABILITIES = (0.6, 0.2, 0.2)
MAX_SHAPES = 3
MIN_SIZE = 16
MAX_SIZE = 2048  # 4x the backbone's 512 px; --size 99999 ended in a 149 GiB MemoryError traceback
# Seed evaluate() uses by default; training data should be written with other seeds so the metrics are held out.
EVAL_SEED = 20240917
BATCH_SIZE = 16

# Caption templates. {fill_shape}: "a cyan circle" / "cyan circles"; {shape_np}: "a circle" / "circles";
# {bg_np}: "a light golden"; {fill}/{bg}: the bare colour wordings. The background colour is always the phrase right
# before the word "background", which is what parse_prompt relies on.
TEMPLATES = (
    "{fill_shape} on {bg_np} background",
    "{shape_np} filled with {fill}, {bg} background",
    "{fill_shape} against {bg_np} background",
    "{bg_np} background with {fill_shape}",
    "{shape_np} in {fill} on {bg_np} background",
)

# Circumradius of each shape relative to its drawn "radius", so squares and triangles look about as big as circles.
_EXTENT = {"circle": 1.0, "square": 1.2, "triangle": 1.25}
_VERTICES = {"square": 4, "triangle": 3}


@dataclass
class CirclesSample:
    """One paired training example.

    Attributes:
        input: RGB picture of the shapes' outlines, white on black.
        target: RGB picture of the shapes filled with ``fill`` on ``background``, no outline, no antialiasing.
        mask: boolean (size, size) array, True where the target is filled.
        prompt: the caption naming both colours.
        fill: canonical name (a key of COLOURS) of the fill colour.
        background: canonical name of the background colour.
        shapes: the kind of each shape drawn ("circle", "square" or "triangle"), in drawing order.
    """

    input: Image.Image
    target: Image.Image
    mask: np.ndarray
    prompt: str
    fill: str
    background: str
    shapes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------------


def outline_width(size: int) -> int:
    """Outline thickness in pixels: 2 at 64 px, scaled with the image size.

    Args:
        size: image side in pixels.

    Returns:
        The width, at least 1.
    """
    return max(1, round(2 * size / 64))


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each of shape (size, size)."""
    ys, xs = np.mgrid[0:size, 0:size]
    return xs.astype(np.float64), ys.astype(np.float64)


def _shape_mask(kind: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Rasterise one filled shape by testing pixel centres, which is exact and free of antialiasing.

    Args:
        kind: "circle", "square" or "triangle".
        cx, cy: centre in pixels.
        radius: the circle's radius, or the polygon's circumradius.
        angle: rotation of the polygon in radians (ignored for circles).
        size: image side in pixels.

    Returns:
        Boolean (size, size) mask.
    """
    xs, ys = _pixel_grid(size)
    if kind == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    count = _VERTICES[kind]
    angles = [angle + 2 * math.pi * k / count for k in range(count)]
    corners = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]
    # A regular polygon is the intersection of the half-planes left of its edges (the corners go counter-clockwise
    # in x/y maths orientation, so the interior has a non-negative cross product with every edge).
    inside = np.ones((size, size), dtype=bool)
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0
    return inside


def _inner_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of ``width`` pixels just inside a mask's border.

    Drawing the outline inside the shape keeps every outline pixel within the filled region, so the input's lines
    coincide with the target's colour boundary instead of straddling it.

    Args:
        mask: boolean mask of one shape.
        width: band thickness in pixels.

    Returns:
        Boolean mask of the band.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    # borderValue 0: treat outside the image as background (shapes are fully inside, but be safe).
    eroded = cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & ~eroded.astype(bool)


def _random_shape(rng: np.random.Generator, size: int) -> tuple[str, float, float, float, float]:
    """Pick a shape kind, size, rotation and a centre that keeps it fully inside the image.

    Args:
        rng: the random generator.
        size: image side in pixels.

    Returns:
        (kind, cx, cy, circumradius, angle).
    """
    kind = str(rng.choice(SHAPES, p=SHAPE_PROBABILITIES))
    radius = rng.uniform(0.1, 0.3) * size * _EXTENT[kind]
    margin = radius + 1.0  # one pixel of air between the shape and the image edge
    cx, cy = rng.uniform(margin, size - 1 - margin, size=2)
    angle = float(rng.uniform(0, 2 * math.pi))
    return kind, float(cx), float(cy), float(radius), angle


# ---------------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------------


def _with_article(phrase: str, plural: bool) -> str:
    """Prefix "a"/"an" to a singular noun phrase; plurals go bare."""
    if plural:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(rng: np.random.Generator, kinds: Sequence[str], fill: str, background: str) -> str:
    """Write a caption naming the shapes and both colours in a random template and random wordings.

    Args:
        rng: the random generator.
        kinds: the kind of every shape drawn.
        fill: canonical fill colour name.
        background: canonical background colour name.

    Returns:
        The caption, e.g. "a cyan circle on a light golden background".
    """
    plural = len(kinds) > 1
    if len(set(kinds)) > 1:
        shape = "shapes"
    else:
        shape = kinds[0] + ("s" if plural else "")
    fill_word = str(rng.choice(WORDINGS[fill]))
    bg_word = str(rng.choice(WORDINGS[background]))
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(
        fill_shape=_with_article(f"{fill_word} {shape}", plural),
        shape_np=_with_article(shape, plural),
        bg_np=_with_article(bg_word, plural=False),
        fill=fill_word,
        bg=bg_word,
    )


def _build_colour_pattern() -> tuple[re.Pattern[str], dict[str, str]]:
    """A regex finding any wording (longest first, whole words) and the map from wording to canonical name."""
    lookup: dict[str, str] = {}
    for name, wordings in WORDINGS.items():
        for wording in wordings:
            lookup[wording] = name
    # Longest first: at one start position the regex takes the first alternative that matches, so "light golden"
    # must be tried before "golden" and "golden yellow" before "golden".
    ordered = sorted(lookup, key=lambda w: (-len(w), w))
    alternatives = "|".join(r"\s+".join(re.escape(part) for part in wording.split()) for wording in ordered)
    return re.compile(rf"\b(?:{alternatives})\b"), lookup


_COLOUR_PATTERN, _WORDING_TO_NAME = _build_colour_pattern()
_BACKGROUND_PATTERN = re.compile(r"\b(?:background|backdrop)\b")


def parse_prompt(prompt: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Recover the fill and background colours a caption asks for.

    The background is the colour named right before the word "background" (or "backdrop"); the fill is the first
    other colour named. Without that word the first colour is the fill and the last the background. This reads every
    caption :func:`make_sample` writes and free prompts such as "a red circle on a blue background".

    Args:
        prompt: the caption.

    Returns:
        (fill_rgb, background_rgb).

    Raises:
        BadInputError: the prompt is not text, names no palette colour, or names only one.
    """
    if not isinstance(prompt, str):
        raise BadInputError(f"The prompt must be text, got {type(prompt).__name__}.")
    text = re.sub(r"[-_]", " ", prompt.lower())
    mentions = [(m.start(), _WORDING_TO_NAME[" ".join(m.group(0).split())]) for m in _COLOUR_PATTERN.finditer(text)]
    known = ", ".join(COLOURS)
    if not mentions:
        raise BadInputError(
            f"No colour found in the prompt {prompt!r}; name a fill and a background colour from: {known} "
            "(e.g. 'a red circle on a blue background')."
        )
    keyword = _BACKGROUND_PATTERN.search(text)
    before = [i for i, (start, _) in enumerate(mentions) if keyword is not None and start < keyword.start()]
    if keyword is not None and before:
        bg_index = before[-1]
    elif len(mentions) >= 2:
        bg_index = len(mentions) - 1
    else:
        bg_index = None
    others = [name for i, (_, name) in enumerate(mentions) if i != bg_index]
    if bg_index is None or not others:
        raise BadInputError(
            f"The prompt {prompt!r} names only one colour; name both the fill and the background colour "
            "(e.g. 'a red circle on a blue background')."
        )
    return COLOURS[others[0]], COLOURS[mentions[bg_index][1]]


# ---------------------------------------------------------------------------------------------------------------------
# Samples and data sets
# ---------------------------------------------------------------------------------------------------------------------


def make_sample(rng: np.random.Generator, size: int = 64) -> CirclesSample:
    """Draw one paired sample.

    Args:
        rng: a ``numpy.random.default_rng`` generator; the sample depends only on its state.
        size: image side in pixels (``MIN_SIZE`` to ``MAX_SIZE``).

    Returns:
        The sample.

    Raises:
        BadInputError: ``size`` is too small to draw shapes on, or too large.
    """
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise BadInputError(f"The circles image size must be from {MIN_SIZE} to {MAX_SIZE} pixels, got {size}.")
    count = int(rng.integers(1, MAX_SHAPES + 1))
    fill, background = (str(name) for name in rng.choice(list(COLOURS), size=2, replace=False))
    width = outline_width(size)

    mask = np.zeros((size, size), dtype=bool)
    outline = np.zeros((size, size), dtype=bool)
    kinds = []
    for _ in range(count):
        kind, cx, cy, radius, angle = _random_shape(rng, size)
        shape = _shape_mask(kind, cx, cy, radius, angle, size)
        mask |= shape
        # Every shape keeps its whole outline, even where another shape overlaps it, like a line drawing would.
        outline |= _inner_outline(shape, width)
        kinds.append(kind)

    input_array = np.zeros((size, size, 3), dtype=np.uint8)
    input_array[outline] = 255
    fill_rgb, background_rgb = np.array(COLOURS[fill], np.uint8), np.array(COLOURS[background], np.uint8)
    target_array = np.where(mask[..., None], fill_rgb, background_rgb)
    return CirclesSample(
        input=Image.fromarray(input_array, "RGB"),
        target=Image.fromarray(target_array.astype(np.uint8), "RGB"),
        mask=mask,
        prompt=_caption(rng, kinds, fill, background),
        fill=fill,
        background=background,
        shapes=tuple(kinds),
    )


def make_samples(n: int, seed: int, size: int = 64) -> list[CirclesSample]:
    """Draw ``n`` samples from one generator seeded with ``seed``.

    Args:
        n: how many samples.
        seed: the seed; the same seed gives the same samples.
        size: image side in pixels.

    Returns:
        The samples, in order.
    """
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size) for _ in range(n)]


def _check_empty_target(out_dir: Path) -> None:
    """Refuse to write into a file or a folder that already holds something, so no data set is mixed or lost."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"{out_dir} is a file, not a folder; pick a new folder for the data set.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BadInputError(f"The data set folder {out_dir} already exists and is not empty; pick a new folder.")


def write_dataset(
    out_dir: str | os.PathLike, n: int, seed: int, size: int = 64, test_fraction: float = 0.1
) -> dict[str, int]:
    """Write ``n`` samples in the paired folder layout the trainer reads.

    Layout: ``train_A/`` (inputs), ``train_B/`` (targets, same file names), ``train_prompts.json`` ({file name:
    caption}), and the same three for ``test``. Files are numbered ``000000.png`` onwards across both splits, so a
    name is unique in the data set; the last ``round(n * test_fraction)`` samples form the test split.

    Args:
        out_dir: the folder to create (it may exist if empty).
        n: total number of samples.
        seed: the seed; the same seed gives byte-identical files.
        size: image side in pixels (a multiple of 8 from ``MIN_SIZE`` to ``MAX_SIZE``).
        test_fraction: share of samples held out for ``test``, in [0, 1).

    Returns:
        {"train": number of training pairs, "test": number of test pairs}.

    Raises:
        BadInputError: ``out_dir`` is a file or a folder that is not empty, or ``n``, ``test_fraction``, ``size`` or
            ``seed`` are out of range.
    """
    out_dir = Path(out_dir)
    if n < 1:
        raise BadInputError(f"A circles data set needs at least one sample, got n={n}.")
    if not 0 <= test_fraction < 1:
        raise BadInputError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    # multiples of 8, as the model takes them without resizing (training's no_resize refused the data set)
    if size % 8:
        raise BadInputError(f"The circles image size must be a multiple of 8 (the model's factor), got {size}.")
    seed = check_seed(seed)
    _check_empty_target(out_dir)

    n_test = min(n - 1, round(n * test_fraction))
    samples = make_samples(n, seed, size)
    splits = {"train": samples[: n - n_test], "test": samples[n - n_test :]}
    index = 0
    for split, split_samples in splits.items():
        (out_dir / f"{split}_A").mkdir(parents=True, exist_ok=True)
        (out_dir / f"{split}_B").mkdir(parents=True, exist_ok=True)
        prompts = {}
        for sample in split_samples:
            name = f"{index:06d}.png"
            sample.input.save(out_dir / f"{split}_A" / name, format="PNG")
            sample.target.save(out_dir / f"{split}_B" / name, format="PNG")
            prompts[name] = sample.prompt
            index += 1
        text = json.dumps(prompts, indent=2, sort_keys=True) + "\n"
        (out_dir / f"{split}_prompts.json").write_text(text, encoding="utf-8")
    return {split: len(split_samples) for split, split_samples in splits.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------


def _as_array(image: Image.Image, size: int) -> np.ndarray:
    """An output as a float (size, size, 3) RGB array, resized if the model answered at another resolution."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64)


def _mean_error(pixels: np.ndarray, where: np.ndarray, colour: np.ndarray) -> float:
    """Mean absolute RGB difference to ``colour`` over the pixels ``where`` is True (0 when there are none)."""
    return float(np.abs(pixels[where] - colour).mean()) if where.any() else 0.0


def _colour_offset(pixels: np.ndarray, where: np.ndarray, colour: np.ndarray) -> float:
    """Mean absolute RGB difference of the mean colour over ``where`` to ``colour`` (0 when ``where`` is empty)."""
    return float(np.abs(pixels[where].mean(axis=0) - colour).mean()) if where.any() else 0.0


def _sample_scores(output: Image.Image, sample: CirclesSample) -> tuple[float, ...]:
    """IoU, fill error, background error, fill error on the outline and inside it, and the fill colour's offset, of
    one output against its sample (see :func:`evaluate_samples`)."""
    mask = sample.mask
    pixels = _as_array(output, mask.shape[0])
    fill = np.array(COLOURS[sample.fill], dtype=np.float64)
    background = np.array(COLOURS[sample.background], dtype=np.float64)
    to_fill = np.linalg.norm(pixels - fill, axis=-1)
    to_background = np.linalg.norm(pixels - background, axis=-1)
    predicted = to_fill < to_background
    union = np.count_nonzero(predicted | mask)
    iou = np.count_nonzero(predicted & mask) / union if union else 1.0
    outline = np.asarray(sample.input.convert("L")) > 127  # the input's drawn lines, all inside the mask
    inside = mask & ~outline
    return (
        float(iou),
        _mean_error(pixels, mask, fill),
        _mean_error(pixels, ~mask, background),
        _mean_error(pixels, mask & outline, fill),
        _mean_error(pixels, inside, fill),
        _colour_offset(pixels, inside, fill),
    )


def evaluate_samples(outputs: Sequence[Image.Image], samples: Sequence[CirclesSample]) -> dict[str, float]:
    """Score model outputs against their samples.

    A pixel counts as filled when its colour is closer (RGB, Euclidean) to the prompted fill colour than to the
    prompted background colour. Errors are mean absolute RGB differences on the 0-255 scale, averaged over channels
    and pixels. Every score is computed per sample, then averaged over samples.

    Args:
        outputs: one RGB picture per sample (resized to the sample size if needed).
        samples: the samples the outputs answer.

    Returns:
        {"iou": mean IoU of the filled region vs the true mask, "fill_error": mean error inside the true mask vs the
        fill colour, "background_error": mean error outside it vs the background colour, "n": number of samples,
        and three diagnoses, not targets: the fill error split in two, "fill_error_outline" on the pixels where the
        input draws the outline (the shapes' border band) and "fill_error_inside" on the rest of the shapes, and
        "fill_colour_offset", the error of the *mean* colour over that rest (a wrong colour, as opposed to noise or
        stripes around the right one)}.

    Raises:
        BadInputError: the counts differ or there are no samples.
    """
    if len(outputs) != len(samples):
        raise BadInputError(f"Got {len(outputs)} outputs for {len(samples)} samples; expected one output per sample.")
    if not samples:
        raise BadInputError("Nothing to evaluate: no samples.")
    scores = np.array([_sample_scores(output, sample) for output, sample in zip(outputs, samples)])
    iou, fill_error, background_error, on_outline, inside, offset = scores.mean(axis=0)
    return {
        "iou": float(iou),
        "fill_error": float(fill_error),
        "background_error": float(background_error),
        "n": len(samples),
        "fill_error_outline": float(on_outline),
        "fill_error_inside": float(inside),
        "fill_colour_offset": float(offset),
    }


def evaluate(
    translate: Callable[[list[Image.Image], list[str]], list[Image.Image]],
    n: int = 200,
    seed: int = EVAL_SEED,
    size: int = 64,
    batch_size: int = BATCH_SIZE,
) -> dict[str, float]:
    """Measure a model on ``n`` fresh samples.

    Args:
        translate: any model callable mapping (input pictures, prompts) to output pictures, one per input.
        n: number of samples.
        seed: the seed of the samples; keep it apart from the training data's seed so they are held out.
        size: image side in pixels.
        batch_size: how many samples go to ``translate`` at once.

    Returns:
        The dict of :func:`evaluate_samples`.

    Raises:
        BadInputError: ``n`` is not positive or ``translate`` returns the wrong number of pictures.
    """
    if n < 1:
        raise BadInputError(f"evaluate needs at least one sample, got n={n}.")
    samples = make_samples(n, seed, size)
    outputs: list[Image.Image] = []
    for start in range(0, n, batch_size):
        batch = samples[start : start + batch_size]
        answer = list(translate([s.input for s in batch], [s.prompt for s in batch]))
        if len(answer) != len(batch):
            raise BadInputError(f"The model returned {len(answer)} pictures for a batch of {len(batch)} inputs.")
        outputs.extend(answer)
    return evaluate_samples(outputs, samples)
