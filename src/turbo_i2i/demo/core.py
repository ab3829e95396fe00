"""The demo's logic as plain functions: what turns a drawing or an upload, a prompt, r, a seed and a model into an
output image. The Gradio app (``app.py``) only wires widgets to these, so all of it is tested without a browser.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import preprocess as pre
from ..errors import BadInputError
from ..pipeline import Translator
from ..registry import MODELS, availability

# Prompt suffixes in the spirit of the official sketch demo's style menu; "{prompt}" is the user's text.
STYLES: dict[str, str] = {
    "none": "{prompt}",
    "photo": "{prompt}, professional photo, sharp focus, highly detailed",
    "cinematic": "cinematic still of {prompt}, shallow depth of field, film grain",
    "watercolor": "watercolor painting of {prompt}, soft washes of colour",
    "anime": "anime artwork of {prompt}, vibrant, studio style",
    "pixel art": "pixel art of {prompt}, 16-bit, crisp pixels",
}
# The side (pixels) a backbone was trained at; drawings are translated at that size, since a model trained on 64 px
# outlines does not read a 512 px drawing. Backbones not listed are SD-Turbo sized.
NATIVE_SIDE = {"tiny": 64, "tiny-circles": 64}
DEFAULT_SIDE = 512
# A model counts as fast enough for "translate on every stroke" when one call at its native size takes less.
LIVE_MAX_SECONDS = 1.0


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model picker.

    Args:
        ref: what ``Translator.from_pretrained`` is given.
        label: what the picker shows (the reason is appended for an unavailable model).
        available: whether it loads without a network.
        reason: why (or why not).
    """

    ref: str
    label: str
    available: bool
    reason: str


def model_choices() -> list[ModelChoice]:
    """The named models for the picker, available ones first, each with the reason from ``registry.availability``.

    Returns:
        a list of ``ModelChoice``.
    """
    choices = []
    for model in MODELS.values():
        ok, reason = availability(model)
        label = model.name if ok else f"{model.name} (unavailable: {reason})"
        choices.append(ModelChoice(model.name, label, ok, reason))
    return sorted(choices, key=lambda c: not c.available)


def styled_prompt(prompt: str | None, style: str | None) -> str | None:
    """Apply a style template to the user's prompt.

    Args:
        prompt: the user's text; empty or None means the model's default caption (and no style).
        style: a key of ``STYLES`` or None.

    Returns:
        the prompt to translate with, or None for the model's default.
    """
    if prompt is None or not prompt.strip():
        return None
    if style not in (None, "", "none") and style not in STYLES:
        raise BadInputError(f"Unknown style {style!r}; expected one of {', '.join(STYLES)}.")
    return STYLES.get(style or "none", "{prompt}").format(prompt=prompt.strip())


def flatten_drawing(drawing) -> Image.Image:
    """The picture a drawing widget holds, as RGB on white (transparent pixels are blank paper).

    Args:
        drawing: a PIL image, an (H, W, 3|4) uint8 array, or Gradio's editor value (a dict with "composite").

    Returns:
        an RGB PIL image.
    """
    if isinstance(drawing, dict):
        drawing = drawing.get("composite")
    if drawing is None:
        raise BadInputError("The canvas is empty; draw something first.")
    if isinstance(drawing, np.ndarray):
        # a cast would turn [0, 1] floats black (and wrap 16-bit values), not scale them
        if drawing.dtype.kind not in "ui" or (drawing.size and not 0 <= drawing.min() <= drawing.max() <= 255):
            raise BadInputError(f"A drawing array must hold 8-bit values (0-255), got {drawing.dtype}.")
        drawing = Image.fromarray(drawing.astype(np.uint8))
    if not isinstance(drawing, Image.Image):
        raise BadInputError(f"Expected a drawing (image), got a {type(drawing).__name__}.")
    if drawing.mode in ("RGBA", "LA", "PA") or "transparency" in drawing.info:
        page = Image.new("RGBA", drawing.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, drawing.convert("RGBA")).convert("RGB")
    return pre.to_rgb(drawing)  # 16-bit and float pictures scaled, not clipped to white


def drawing_to_condition(drawing, side: int) -> Image.Image:
    """Turn dark strokes on a light canvas into the model input: white strokes on black at the model's size.

    The strokes are binarised before and after shrinking, so a thin line stays a solid line (as in the training
    outlines) instead of fading to grey.

    Args:
        drawing: see ``flatten_drawing``.
        side: the longer side of the result in pixels (the model's native size).

    Returns:
        an RGB PIL image, every pixel black or white.
    """
    strokes = np.asarray(pre.sketch(flatten_drawing(drawing)).convert("L"), dtype=np.float32)
    size = _fit(strokes.shape[1], strokes.shape[0], side)
    if size != (strokes.shape[1], strokes.shape[0]):
        # Area averaging keeps every stroke that covers a quarter of an output pixel: a 12 px brush on a 512 px
        # canvas becomes a 2 px line at 64 px, the outline width the built-in model was trained on.
        small = np.asarray(Image.fromarray(strokes).resize(size, Image.Resampling.BOX))
        strokes = np.where(small >= 64, 255, 0)
    return Image.fromarray(np.repeat(strokes.astype(np.uint8)[:, :, None], 3, axis=2))


def upload_to_condition(image, edges: str, low: int, high: int, side: int) -> Image.Image:
    """Turn an uploaded picture into the model input: its Canny edge map, or the picture itself, at the model's size.

    Args:
        image: a PIL image or an (H, W, 3) array.
        edges: "canny" or "none".
        low: Canny low threshold (0-255).
        high: Canny high threshold (0-255).
        side: the longer side of the result in pixels.

    Returns:
        an RGB PIL image.
    """
    if image is None:
        raise BadInputError("No picture uploaded; upload one first.")
    if edges == "canny":  # before int(): None or NaN from a form is named, not a TypeError / ValueError
        pre.check_canny_thresholds(low, high)
    rgb = flatten_drawing(image)
    rgb = rgb.resize(_fit(rgb.width, rgb.height, side), Image.Resampling.LANCZOS)
    if edges == "canny":
        return pre.canny(rgb, int(low), int(high))
    if edges != "none":
        raise BadInputError(f"Unknown edge extraction {edges!r}; expected canny or none.")
    return rgb


def _whole_number(value: object) -> object:
    """A number box's float as an int when it is whole (Gradio sends 3.0 for 3); anything else as it came, for the
    library's own check to name (2.7 was cut to 2, NaN raised a ValueError)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``side``."""
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class DemoBackend:
    """Translators loaded once per model and shared by every user of the demo.

    Concurrent users never mix settings: each call passes its own prompt, r and seed to ``Translator.__call__``,
    which runs one call at a time under its lock. Loading is locked per model, so two users picking the same model
    at once load it once.

    Args:
        device: torch device for every model (CPU when None).
        dtype: weight dtype (None: float32).
        max_models: models kept loaded at once; the least recently used one is dropped beyond that.
    """

    def __init__(self, device=None, dtype=None, max_models: int = 2):
        self.device = device
        self.dtype = dtype
        self.max_models = max_models
        self._translators: OrderedDict[str, Translator] = OrderedDict()
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @staticmethod
    def resolve(model: str | None, folder: str | None = None) -> str:
        """The model reference to load: a local folder when one is typed, else the picked name.

        Args:
            model: a picker value (a name from ``MODELS``).
            folder: a local model folder (wins when not blank).

        Returns:
            the reference for ``Translator.from_pretrained``.
        """
        if folder and folder.strip():
            path = Path(folder.strip()).expanduser()
            if not path.is_dir():
                raise BadInputError(f"Model folder {str(path)!r} does not exist; give a folder saved by turbo-i2i.")
            return str(path)
        if not model:
            raise BadInputError("Pick a model.")
        return model

    def translator(self, ref: str) -> Translator:
        """The loaded ``Translator`` for a model reference (loaded on first use).

        Args:
            ref: a model name, folder or hub id.

        Returns:
            the shared ``Translator``.
        """
        with self._lock:
            if ref in self._translators:
                self._translators.move_to_end(ref)
                return self._translators[ref]
            loading = self._loading.setdefault(ref, threading.Lock())
        with loading:
            with self._lock:
                if ref in self._translators:
                    return self._translators[ref]
            kwargs = {} if self.dtype is None else {"dtype": self.dtype}
            translator = Translator.from_pretrained(ref, device=self.device, **kwargs)
            with self._lock:
                self._translators[ref] = translator
                while len(self._translators) > self.max_models:
                    self._translators.popitem(last=False)
        return translator

    def native_side(self, ref: str) -> int:
        """The image side the model was trained at (``NATIVE_SIDE``; SD-Turbo's 512 otherwise)."""
        return NATIVE_SIDE.get(self.translator(ref).config.base_model, DEFAULT_SIDE)

    def is_fast(self, ref: str) -> bool:
        """Whether one call takes under ``LIVE_MAX_SECONDS`` (timed once per model on a blank input).

        Returns:
            True when live translation on every stroke keeps up.
        """
        if ref not in self._seconds:
            side = self.native_side(ref)
            blank = Image.new("RGB", (side, side))
            translator = self.translator(ref)
            # Models without a default caption (the official edge and sketch ones) need one; its words cost nothing.
            prompt = translator.config.prompts.get(translator.config.default_direction, "a photo")
            translator(blank, prompt, edges=None, seed=0)  # the first call pays one-off costs (allocations, kernels)
            start = time.perf_counter()
            translator(blank, prompt, edges=None, seed=0)
            self._seconds[ref] = time.perf_counter() - start
        return self._seconds[ref] < LIVE_MAX_SECONDS

    def translate(
        self,
        condition: Image.Image,
        prompt: str | None,
        style: str | None,
        r: float | None,
        seed: int | None,
        ref: str,
        direction: str | None = None,
    ) -> Image.Image:
        """Translate a ready model input (see ``drawing_to_condition`` / ``upload_to_condition``).

        Args:
            condition: the model input.
            prompt: the user's caption (blank: the model's default).
            style: a key of ``STYLES``.
            r: stochastic models: faithfulness in [0, 1]; ignored by deterministic models.
            seed: seed of the noise map.
            ref: the model reference.
            direction: "a2b" or "b2a" for unpaired models (None: the model's); ignored by paired models.

        Returns:
            the output image, at the condition's size.
        """
        translator = self.translator(ref)
        r = r if translator.config.stochastic else None  # checked by the Translator (a string is named, not cast)
        seed = None if seed is None else _whole_number(seed)
        # The input is already what the model reads (strokes or edges), so the model's own extraction is skipped.
        direction = direction if len(translator.config.directions) > 1 else None
        return translator(
            condition, prompt=styled_prompt(prompt, style), direction=direction or None, r=r, seed=seed, edges=None
        )

    def translate_drawing(
        self,
        drawing,
        prompt: str | None,
        style: str | None = "none",
        r: float | None = None,
        seed: int | None = 0,
        model: str = "demo-circles",
        folder: str | None = None,
        direction: str | None = None,
    ) -> Image.Image:
        """Canvas in, picture out: what the demo runs on each stroke and on "Run".

        Args:
            drawing: the canvas (see ``flatten_drawing``): dark strokes on a light page.
            prompt: the caption (blank: the model's default).
            style: a key of ``STYLES``.
            r: stochastic models: faithfulness in [0, 1].
            seed: seed of the noise map.
            model: a named model (the picker's value).
            folder: a local model folder, used instead of ``model`` when not blank.
            direction: "a2b" or "b2a" for unpaired models (None: the model's).

        Returns:
            the output image at the drawing's size (translated at the model's native size, then scaled).
        """
        ref = self.resolve(model, folder)
        page = flatten_drawing(drawing)
        # the result is scaled back to the page's size: a 20000 px page would make a 1.2 GB picture
        pre.check_size(page.size, pre.MAX_PIXELS, "The drawing")
        out = self.translate(drawing_to_condition(page, self.native_side(ref)), prompt, style, r, seed, ref, direction)
        return out.resize(page.size, Image.Resampling.BICUBIC) if out.size != page.size else out

    def translate_upload(
        self,
        image,
        edges: str,
        low: int,
        high: int,
        prompt: str | None,
        style: str | None = "none",
        r: float | None = None,
        seed: int | None = 0,
        model: str = "demo-circles",
        folder: str | None = None,
        direction: str | None = None,
    ) -> tuple[Image.Image, Image.Image]:
        """Upload in, (model input, picture) out: the upload tab's translation.

        Args:
            image: the uploaded picture.
            edges: "canny" or "none".
            low: Canny low threshold.
            high: Canny high threshold.
            prompt, style, r, seed, model, folder, direction: as in ``translate_drawing``.

        Returns:
            (the edge map or resized picture the model read, the output image at the same size).
        """
        ref = self.resolve(model, folder)
        condition = upload_to_condition(image, edges, low, high, self.native_side(ref))
        return condition, self.translate(condition, prompt, style, r, seed, ref, direction)
