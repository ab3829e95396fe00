"""``Translator``: one-step image-to-image translation from Python, the recipe every front end calls."""

from __future__ import annotations

import logging
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from . import preprocess as pre
from .backbone import Backbone, encode_prompt
from .config import INPUT_RANGES, GeneratorConfig
from .devices import check_batch_size, check_device, check_dtype
from .errors import BadInputError
from .generator import OneStepGenerator
from .precision import dtype_name, warn_if_emulated
from .registry import load_model
from .seeds import check_seed
from .subpixel import use_subpixel_upsampling
from .tiling import translate_tiled

logger = logging.getLogger("turbo_i2i")

ImageInput = str | os.PathLike | Image.Image | torch.Tensor
PROMPT_CACHE_SIZE = 64
TILE_OVERLAP = 64  # pixels shared by neighbouring tiles, blended with linear ramps


def channels_last_is_faster(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fast path runs in channels-last (NHWC) memory on ``device`` in ``dtype``.

    Convolutions are fastest in NHWC with cuDNN, and with oneDNN in half precision (this project's CPU, full-size
    model, bf16, 512 px: 14.4 s against 17.8 s per image). oneDNN's fp32 ones measured as fast in either layout, so
    fp32 on the CPU keeps the layout the weights come in.
    """
    return device.type == "cuda" or dtype in (torch.bfloat16, torch.float16)


def check_tensor_range(image: torch.Tensor) -> None:
    """Refuse a float tensor image that holds another convention's values than [0, 1] (they would be clamped).

    Resampling overshoots [0, 1] (bicubic rings reach about -0.4 .. 1.4 on sharp edges): that is clamped, as before.
    What is refused is clearly another convention: values above 2 (0-255) or below -0.5 ([-1, 1]), or not finite.

    Args:
        image: a (3, H, W) float tensor.

    Raises:
        BadInputError: naming the values found and the usual fix.
    """
    if not image.numel():
        return  # no pixels: said by the image checks that follow
    if not torch.isfinite(image).all():
        raise BadInputError("A tensor image holds NaN or infinite values; pass finite values in [0, 1].")
    low, high = float(image.min()), float(image.max())
    if high > 2:
        raise BadInputError(f"A tensor image must hold values in [0, 1], got values up to {high:g}: divide by 255.")
    if low < -0.5:
        raise BadInputError(
            f"A tensor image must hold values in [0, 1], got values down to {low:g}: map [-1, 1] with (x + 1) / 2."
        )


def check_prompt(prompt: object) -> str:
    """Refuse a prompt that is not a non-empty string (a caller can check one before loading a model).

    Args:
        prompt: the caption.

    Returns:
        the prompt.

    Raises:
        BadInputError: it is not a string, or is empty.
    """
    if not isinstance(prompt, str):
        raise BadInputError(f"A prompt must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise BadInputError("The prompt is empty; describe the output image, or omit it to use the default.")
    return prompt


def check_tile_size(tile_size: int | None, name: str = "tile_size") -> None:
    """Refuse a tile size ``Translator`` cannot use.

    Args:
        tile_size: pixels, or None (no tiling).
        name: how the message names the option (``--tile`` on the command line).

    Raises:
        BadInputError: not a multiple of 8 (the VAE's factor), or too small for the tiles' overlap.
    """
    if tile_size is None:
        return
    whole = not isinstance(tile_size, bool) and isinstance(tile_size, numbers.Integral)
    if not whole or tile_size % 8 or tile_size < 2 * TILE_OVERLAP:
        raise BadInputError(f"{name} must be a multiple of 8 and at least {2 * TILE_OVERLAP}, got {tile_size!r}.")


class Translator:
    """A loaded one-step model, ready to translate images.

    Args:
        generator: the one-step generator.
        backbone: the backbone it was built on (its tokenizer and text encoder encode prompts).
        max_pixels: images whose header claims more pixels are refused before decoding.
        fast: merge LoRA into the base weights (at the model's default r), sub-pixel upsampling (``subpixel.py``),
            channels-last memory on GPU and in half precision on CPU, and on GPU ``torch.backends.cudnn.benchmark``.
        dtype: cast weights to this dtype (after merging, so merged weights round once); None keeps them.
        compile: ``torch.compile`` the whole generator pass as one function: True, or a ``torch.compile`` mode
            ("default", "reduce-overhead": CUDA graphs on GPUs, "max-autotune", ...). The first call compiles, and so
            do new image sizes and each new ``r`` of a stochastic model (minutes at full size).
    """

    def __init__(
        self,
        generator: OneStepGenerator,
        backbone: Backbone,
        max_pixels: int = pre.MAX_PIXELS,
        fast: bool = True,
        dtype: torch.dtype | None = None,
        compile: bool | str = False,
    ):
        self.generator = generator.eval()
        self.tokenizer = backbone.tokenizer
        self.text_encoder = backbone.text_encoder
        self.max_pixels = max_pixels
        self.channels_last = fast and channels_last_is_faster(self.device, dtype or self.dtype)
        if fast:
            # LoRA merged while the weights are still in the precision they were loaded in (fp32 from
            # from_pretrained), so the merged weights round once; a call with another r unmerges automatically.
            generator.merge_lora(generator.config.default_r if generator.config.stochastic else None)
            # The same upsample + 3x3 conv as four 2x2 convs on the low-resolution input: 4/9 of the work.
            use_subpixel_upsampling(generator)
        if self.channels_last:
            generator.to(memory_format=torch.channels_last)
        if fast and self.device.type == "cuda":
            # A one-step model sees the same shapes call after call: let cuDNN time its convolution algorithms once
            # per shape and keep the fastest (a process-wide setting, as torch has no per-module one).
            torch.backends.cudnn.benchmark = True
        if dtype is not None:
            warn_if_emulated(self.device, dtype, f"dtype {dtype_name(dtype)}")
            generator.to(dtype)
            self.text_encoder.to(dtype)
        # One function for the whole pass, not its parts: the VAE encoder's skips then never leave the compiled graph,
        # which CUDA graphs ("reduce-overhead") need (compiled apart, the UNet's graph overwrote the encoder's
        # outputs before the decoder read them). A call's output is read before the next call, as CUDA graphs need.
        self._forward = generator
        if compile:
            self._forward = torch.compile(generator, mode="default" if compile is True else compile)
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # One call at a time: a call sets LoRA scales for its own r; concurrent callers (a web demo) must not mix.
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        fast: bool = True,
        compile: bool | str = False,
        base_model: str | os.PathLike | None = None,
        max_pixels: int = pre.MAX_PIXELS,
    ) -> Translator:
        """Load a named model, a model folder, an official ``.pkl`` file or a hub id.

        Args:
            name_or_path: see ``registry.load_model``.
            device: where to run (CPU when None).
            dtype: weight dtype or its name (float32 by default; bfloat16/float16 for speed, see the README's
                performance table).
            fast: merge LoRA into the base weights, sub-pixel upsampling, and channels-last memory where it is
                faster (same results up to float rounding).
            compile: ``torch.compile`` the generator pass: True or a mode, as for ``Translator`` (slow first call,
                faster later ones).
            base_model: the backbone to load the model on (a hub id or local diffusers folder) instead of the one its
                config names; needed for a model trained on a local backbone folder (see ``registry.load_model``).
            max_pixels: images whose header claims more pixels are refused before decoding.

        Returns:
            a ``Translator``.
        """
        device, dtype = check_device(device), check_dtype(dtype)
        generator, backbone = load_model(
            name_or_path, device=device, dtype=torch.float32 if fast else dtype, base_model=base_model
        )
        translator = cls(
            generator, backbone, max_pixels=max_pixels, fast=fast, dtype=dtype if fast else None, compile=compile
        )
        if not fast:  # loaded in dtype already; the fast path warns as it casts
            warn_if_emulated(translator.device, dtype, f"dtype {dtype_name(dtype)}")
        return translator

    @property
    def config(self) -> GeneratorConfig:
        return self.generator.config

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.parameters()).dtype

    def forward(self, x: torch.Tensor, prompt_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
        """One generator pass on a prepared batch, compiled when the ``Translator`` compiles (``__call__`` prepares
        the batch and calls this). Unlike ``__call__`` it takes no lock: one caller at a time.

        Args:
            x: images (N, 3, H, W) in the model's input range, in the ``Translator``'s dtype and memory format.
            prompt_embeds: from ``encode_prompt``.
            **kwargs: the rest of ``OneStepGenerator.forward``'s arguments (direction, r, noise, ...).

        Returns:
            images (N, 3, H, W) in [-1, 1]; under CUDA graphs (compile="reduce-overhead") in the graphs' memory, which
            the next call overwrites: copy what you keep.
        """
        return self._forward(x, prompt_embeds, **kwargs)

    # --- recipe steps --------------------------------------------------------------------------------------------

    def _latent_draws(
        self, x: torch.Tensor, r: float | None, sample_posterior: bool, rngs: list[torch.Generator] | None
    ) -> dict[str, torch.Tensor]:
        """The random latent maps a generator call on images ``x`` would draw, drawn as it would (the posterior's
        draw first, then the noise map), by the generator's keyword."""
        shape = (x.shape[0], self.generator.unet.config.in_channels, x.shape[-2] // 8, x.shape[-1] // 8)
        draws = {}
        if sample_posterior:
            draws["posterior_noise"] = randn_tensor(shape, generator=rngs, device=x.device, dtype=x.dtype)
        if r is not None and r < 1.0:
            draws["noise"] = randn_tensor(shape, generator=rngs, device=x.device, dtype=x.dtype)
        return draws

    def _resolve_prompt(self, prompt: str | None, direction: str) -> str:
        if prompt is None:
            prompt = self.config.prompts.get(direction)
            if prompt is None:
                raise BadInputError(f"This model has no default prompt for direction {direction!r}; pass a prompt.")
        return check_prompt(prompt)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings (1, 77, D) for ``prompt``, cached (the text encoder runs once per distinct prompt).

        Prompts longer than 77 tokens are cut there, with a warning.
        """
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return self._prompt_cache[prompt]
        embeds, truncated = encode_prompt(self.tokenizer, self.text_encoder, [prompt])
        if truncated:
            logger.warning("The prompt is longer than %d tokens and was cut there.", self.tokenizer.model_max_length)
        self._prompt_cache[prompt] = embeds.to(self.dtype)
        if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return self._prompt_cache[prompt]

    def check_options(
        self,
        prompt: str | Sequence[str] | None = None,
        direction: str | None = None,
        batch_size: int = 8,
        tile_size: int | None = None,
        r: float | None = None,
        edges: str | None = "default",
        canny_thresholds: tuple[int, int] = (100, 200),
    ) -> tuple[str, str | None]:
        """Refuse options every call with them would refuse, before any image is read (a folder is checked once).

        Args:
            prompt: one caption, or None for the model's default (which must exist); a list is checked per image
                by ``__call__``.
            direction, batch_size, tile_size, r, edges, canny_thresholds: as in ``__call__``.

        Returns:
            (the direction, the edge extraction): the model's own for None / "default".

        Raises:
            BadInputError: naming the option.
        """
        direction = direction or self.config.default_direction
        if direction not in self.config.directions:
            raise BadInputError(
                f"Unknown direction {direction!r}; this model has {', '.join(self.config.directions)}."
            )
        check_batch_size(batch_size)
        check_tile_size(tile_size)
        self.generator.check_r(r)
        edges = self.config.preprocess if edges == "default" else edges
        edges = None if edges == "none" else edges  # the command line's spelling of None
        if edges not in ("canny", "sketch", None):
            raise BadInputError(f"Unknown edge extraction {edges!r}; expected canny, sketch or None.")
        if edges == "canny":
            if isinstance(canny_thresholds, (str, bytes)) or not (
                isinstance(canny_thresholds, Sequence) and len(canny_thresholds) == 2
            ):
                raise BadInputError(f"canny_thresholds must be (low, high), got {canny_thresholds!r}.")
            pre.check_canny_thresholds(*canny_thresholds)
        if prompt is None or isinstance(prompt, str):
            self._resolve_prompt(prompt, direction)
        return direction, edges

    def prepare(self, image: ImageInput, edges: str | None, canny_thresholds: tuple[int, int]) -> Image.Image:
        """Load one input as RGB and apply the edge / sketch extraction the model expects."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise BadInputError(f"A tensor image must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}.")
            if not image.is_floating_point():  # 0-255 values would be clamped to black and white
                raise BadInputError(f"A tensor image must hold floats in [0, 1], not {image.dtype}: divide by 255.")
            image = image.detach()  # a tensor that needs a gradient is read, not differentiated through
            check_tensor_range(image)
            image = Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
        rgb = pre.load_image_or_pil(image, max_pixels=self.max_pixels)
        if edges == "canny":
            return pre.canny(rgb, *canny_thresholds)
        if edges == "sketch":
            return pre.sketch(rgb)
        if edges is not None:
            raise BadInputError(f"Unknown edge extraction {edges!r}; expected canny, sketch or None.")
        return rgb

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompt: str | Sequence[str] | None = None,
        direction: str | None = None,
        r: float | None = None,
        seed: int | None = None,
        edges: str | None = "default",
        canny_thresholds: tuple[int, int] = (100, 200),
        sample_posterior: bool = False,
        batch_size: int = 8,
        tile_size: int | None = None,
    ) -> Image.Image | list[Image.Image]:
        """Translate one image or a batch, each in one UNet evaluation.

        Args:
            images: a path, PIL image or (3, H, W) tensor in [0, 1], or a list of them (or an (N, 3, H, W) tensor).
            prompt: one caption for all, one per image, or None for the model's default for ``direction``.
            direction: "a2b" or "b2a" for unpaired models (default: the model's).
            r: stochastic models: faithfulness in [0, 1] (default: the model's).
            seed: seeds each image's noise map and posterior sampling; the same image with the same seed gives the
                same result, whichever images share the call (so several copies of one image give one result: vary
                the seed for variants).
            edges: "canny", "sketch" or None (use the input as is); "default" takes the model's own setting.
            canny_thresholds: (low, high) hysteresis thresholds of the Canny detector, 0-255 (default 100, 200).
            sample_posterior: sample the VAE posterior instead of its mode (random unless ``seed`` is given).
            batch_size: images per forward pass.
            tile_size: translate images larger than this (pixels, a multiple of 8) in overlapping tiles of this size,
                so memory stays flat for any image size; the result then differs from the untiled one at tile
                seams and in global context (see ``tiling``). None: whole images.

        Returns:
            a PIL image per input, at the input's size (a single image for a single input).
        """
        # 1. check inputs
        single = isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, torch.Tensor) and images.ndim == 3
        )
        if not isinstance(images, (str, os.PathLike, Image.Image, torch.Tensor, list, tuple)):
            raise BadInputError(
                f"Expected an image path, a PIL image, a tensor or a list of them, got a {type(images).__name__}."
            )
        if isinstance(images, torch.Tensor) and (images.ndim not in (3, 4) or images.shape[-3] != 3):
            raise BadInputError(
                "A tensor must be one image (3, H, W) or a batch (N, 3, H, W) in [0, 1], got shape"
                f" {tuple(images.shape)}."
            )
        items = [images] if single else list(images)
        if not items:
            raise BadInputError("No images to translate.")
        direction, edges = self.check_options(prompt, direction, batch_size, tile_size, r, edges, canny_thresholds)
        seed = None if seed is None else check_seed(seed)
        if sample_posterior not in (True, False):  # "no" would be truthy: it sampled
            raise BadInputError(f"sample_posterior must be True or False, got {sample_posterior!r}.")
        if isinstance(prompt, (bytes, bytearray)) or not (prompt is None or isinstance(prompt, (str, Sequence))):
            raise BadInputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
        prompts = [prompt] * len(items) if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(items):
            raise BadInputError(f"Got {len(prompts)} prompts for {len(items)} images.")
        prompts = [self._resolve_prompt(p, direction) for p in prompts]
        if r is None and self.config.stochastic:
            r = self.config.default_r
        # 2. preprocess: RGB, edges, model size (multiples of 8)
        inputs = [self.prepare(image, edges, canny_thresholds) for image in items]
        low, high = INPUT_RANGES[self.config.input_range]
        outputs: list[Image.Image | None] = [None] * len(items)
        with self._lock:
            # 3. encode the prompts once each
            embeds = [self.encode_prompt(p) for p in prompts]
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, image in enumerate(inputs):
                size = pre.model_size(*image.size, max_pixels=max(self.max_pixels, pre.MIN_RUN_PIXELS))
                by_size.setdefault(size, []).append(i)
            for size, indices in by_size.items():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    resized = [inputs[i].resize(size, Image.Resampling.LANCZOS) for i in chunk]
                    x = pre.pil_to_tensor(resized, (low, high), self.device).to(self.dtype)
                    if self.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    e = torch.cat([embeds[i] for i in chunk])
                    # Each image draws from its own generator seeded with ``seed``: its noise map and posterior sample
                    # (so its result) do not depend on the other images of the call, their order or the batch size.
                    rngs = None if seed is None else [torch.Generator(self.device).manual_seed(seed) for _ in chunk]
                    # 4. one UNet evaluation, decoded with the skips
                    translate = partial(
                        self.forward, prompt_embeds=e, direction=direction, r=r,
                        sample_posterior=sample_posterior, generator=rngs,
                    )  # fmt: skip
                    with torch.no_grad():
                        if not tile_size or max(x.shape[-2:]) <= tile_size:
                            y = translate(x)  # (the generator's own draws, in its order: the same image as untiled)
                        else:  # one draw of each map for the whole image (in the generator's order), tiles take parts
                            latents = self._latent_draws(x, r, sample_posterior, rngs)
                            y = translate_tiled(translate, x, tile_size, TILE_OVERLAP, latents=latents)
                    # 5. back to PIL at the input's size
                    for i, out in zip(chunk, pre.tensor_to_pil(y)):
                        outputs[i] = (
                            out if out.size == inputs[i].size else out.resize(inputs[i].size, Image.Resampling.LANCZOS)
                        )
        return outputs[0] if single else outputs
