"""Load the parts of the one-step text-to-image backbone (SD-Turbo): tokenizer, text encoder, UNet, VAE and the
one-step scheduler maths.

A backbone comes from (a) a hub id (default ``stabilityai/sd-turbo``), (b) a local folder in the diffusers layout
(``tokenizer/``, ``text_encoder/``, ``unet/``, ``vae/``, ``scheduler/``), or (c) a named built-in tiny config
(random weights from a fixed seed) used by the tests and by the offline demo model.
"""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .errors import BadInputError, TurboI2IError
from .hub import hub_cache, hub_offline, hub_reachable

logger = logging.getLogger("turbo_i2i")

DEFAULT_BACKBONE = "stabilityai/sd-turbo"
BACKBONE_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")  # the folders a diffusers backbone has

# SD-Turbo's scheduler (DDPM, scaled_linear betas); the one step runs at the last training timestep.
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}

# Built-in tiny backbones: same block types as SD-Turbo (cross-attention blocks, linear projections, a VAE with
# four down blocks so all four skip levels exist), a few million parameters. Weights are random from `seed`.
BUILTIN_BACKBONES: dict[str, dict] = {
    "tiny": {
        "seed": 0,
        "unet": {
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
            "use_linear_projection": True,
            "sample_size": 8,
        },
        "vae": {
            "block_out_channels": [16, 16, 32, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "latent_channels": 4,
            "sample_size": 64,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": 32,
        },
    },
}
# The demo model's backbone: wider than "tiny" so it can learn colours and shapes from scratch on a CPU.
BUILTIN_BACKBONES["tiny-circles"] = {
    "seed": 0,
    "unet": {
        **BUILTIN_BACKBONES["tiny"]["unet"],
        "block_out_channels": [64, 128],
        "attention_head_dim": 2,  # diffusers reads this as the number of heads: 2 heads of 32 / 64 channels
        "cross_attention_dim": 64,
        "in_channels": 8,  # = the VAE's latent channels
        "out_channels": 8,
    },
    # 16 channels at full resolution, where a CPU training step spends most of its convolution time: the preset's
    # step is 1.31x slower with 32 (benchmarks/demo_step.py). The shapes are flat colours; the wider levels below
    # carry the colour and the layout.
    # 8 latent channels, not SD's 4: the skips carry the outlines but no colour, so the fill colour reaches the
    # decoder only through the 8x8 latent, where a cell holding part of a small shape must carry two colours (six
    # numbers). With 4 the model's fill colour was 6.9/255 off on average (eval-demo's fill_colour_offset), with 8
    # 3.7/255 (README); the extra cost is a few convolutions at 8x8.
    "vae": {**BUILTIN_BACKBONES["tiny"]["vae"], "block_out_channels": [16, 32, 64, 64], "latent_channels": 8},
    "text_encoder": {**BUILTIN_BACKBONES["tiny"]["text_encoder"], "hidden_size": 64, "intermediate_size": 128},
}


@dataclass
class OneStepSchedule:
    """The DDPM maths of the single denoising step.

    Args:
        timestep: the timestep the UNet is evaluated at (999 for SD-Turbo).
        alpha_cumprod: abar at that timestep.
        prediction_type: what the UNet predicts, as diffusers names it: "epsilon" (SD-Turbo), "v_prediction" or
            "sample" (the clean latent itself).
    """

    timestep: int
    alpha_cumprod: float
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise BadInputError(
                f"Unknown scheduler prediction_type {self.prediction_type!r};"
                " expected epsilon, v_prediction or sample."
            )

    @classmethod
    def from_config(cls, config: dict) -> OneStepSchedule:
        """Build from a diffusers scheduler config, at the last training timestep (999 for SD-Turbo)."""
        scheduler = DDPMScheduler.from_config({**SCHEDULER_CONFIG, **config})
        t = scheduler.config.num_train_timesteps - 1
        return cls(
            timestep=t,
            alpha_cumprod=float(scheduler.alphas_cumprod[t]),
            prediction_type=scheduler.config.prediction_type,
        )

    def x0(self, x_t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The clean latent from the UNet's output.

        epsilon: x0 = (x_t - sqrt(1 - abar) * eps) / sqrt(abar); v_prediction: x0 = sqrt(abar) * x_t - sqrt(1 - abar)
        * v; sample: x0 is the output.

        Args:
            x_t: the UNet's input latent.
            model_output: the UNet's prediction.

        Returns:
            the clean latent x0.
        """
        a, s = math.sqrt(self.alpha_cumprod), math.sqrt(1.0 - self.alpha_cumprod)
        if self.prediction_type == "epsilon":
            return (x_t - s * model_output) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * model_output
        return model_output


@dataclass
class Backbone:
    """The pretrained parts a one-step generator is built on.

    Args:
        tokenizer: CLIP BPE tokenizer (77 tokens).
        text_encoder: CLIP text model; its last hidden state conditions the UNet.
        unet: the denoising UNet (predicts epsilon).
        vae: the autoencoder (latents scaled by ``vae.config.scaling_factor``).
        schedule: the one-step scheduler maths.
        name: where it came from (hub id, folder or built-in name), recorded in checkpoints.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    schedule: OneStepSchedule
    name: str


def build_clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, built offline from the vocabulary file shipped inside ``open-clip-torch``.

    Same vocabulary (49408 tokens) and padding ("!", id 0) as SD-Turbo's tokenizer.

    Returns:
        a ``CLIPTokenizer`` with ``model_max_length`` 77.
    """
    from open_clip.tokenizer import bytes_to_unicode

    path = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    with path.open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    # The same slice open_clip takes: the first line is a header, and 49408 = 256 bytes * 2 + merges + 2 specials.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    )
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, merges=merges, pad_token="!", model_max_length=77
    )


def _build_builtin(name: str) -> Backbone:
    spec = BUILTIN_BACKBONES[name]
    # A private RNG stream: building a built-in backbone never disturbs the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    schedule = OneStepSchedule.from_config(spec.get("scheduler", {}))
    return Backbone(build_clip_tokenizer(), text_encoder, unet, vae, schedule, name)


def _missing_weights_message(name: str, error: Exception, unreachable: bool = False) -> str:
    reason = "the hub could not be reached and it is not in the local cache" if unreachable else None
    reason = reason or f"{type(error).__name__}: {(str(error) or '-').splitlines()[0]}"
    return (
        f"Could not load the backbone {name!r} ({reason})."
        f" It was looked for as a local folder in the diffusers layout (tokenizer/, text_encoder/, unet/, vae/,"
        f" scheduler/) and as a Hugging Face hub id in the local cache ({hub_cache()}) and, unless HF_HUB_OFFLINE=1,"
        f" on the hub. To provide it: download it once on a machine with a network"
        f" (`hf download {name}`) and copy the cache, or pass the path of a local folder, or set HF_HOME"
        f" to a cache that holds it. Built-in backbones that need no download: {', '.join(BUILTIN_BACKBONES)}."
    )


def load_backbone(
    name_or_path: str | os.PathLike = DEFAULT_BACKBONE,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
) -> Backbone:
    """Load tokenizer, text encoder, UNet, VAE and the one-step schedule.

    Args:
        name_or_path: a built-in name (see ``BUILTIN_BACKBONES``), a local folder in the diffusers layout, or a hub id.
        device: where to put the weights (CPU when None).
        dtype: weight dtype (float32 by default).
        local_files_only: never reach the hub (defaults to the ``HF_HUB_OFFLINE`` setting).

    Returns:
        a ``Backbone`` with every module in eval mode and ``requires_grad`` off.

    Raises:
        TurboI2IError: the weights are neither on disk nor reachable, with what was looked for and how to provide them.
    """
    name = str(name_or_path)
    if name in BUILTIN_BACKBONES:
        backbone = _build_builtin(name)
    else:
        if local_files_only is None:
            local_files_only = hub_offline()
        if not Path(name).is_dir() and (Path(name).exists() or name.count("/") != 1):
            raise BadInputError(
                f"Backbone {name!r} is neither a folder in the diffusers layout, a hub id (owner/name), nor one of the"
                f" built-in backbones ({', '.join(BUILTIN_BACKBONES)})."
            )
        missing = [part for part in BACKBONE_PARTS if not (Path(name) / part).is_dir()] if Path(name).is_dir() else []
        if missing:  # a folder of something else: bad input, not weights to download
            raise BadInputError(
                f"Backbone folder {name!r} is not in the diffusers layout: it has no {', '.join(missing)} folder(s)"
                f" (expected {', '.join(BACKBONE_PARTS)}, as in a download of {DEFAULT_BACKBONE})."
            )
        unreachable = not local_files_only and not Path(name).is_dir() and not hub_reachable()
        if unreachable:  # the cache may hold it; asking the hub would only retry for minutes
            logger.warning("The Hugging Face hub cannot be reached; looking for %s in the local cache only.", name)
        kwargs = {"local_files_only": local_files_only or unreachable, "cache_dir": hub_cache()}
        try:
            tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kwargs)
            text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kwargs)
            unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kwargs)
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **kwargs)
            scheduler_config = DDPMScheduler.load_config(name, subfolder="scheduler", **kwargs)
        except (OSError, ValueError) as error:  # huggingface_hub's offline/not-found errors are OSErrors
            raise TurboI2IError(_missing_weights_message(name, error, unreachable)) from error
        backbone = Backbone(
            tokenizer, text_encoder, unet, vae, OneStepSchedule.from_config(dict(scheduler_config)), name
        )
    for module in (backbone.text_encoder, backbone.unet, backbone.vae):
        module.requires_grad_(False).eval().to(device)
        if dtype != torch.float32:  # diffusers warns on any dtype cast, so cast only when it changes something
            module.to(dtype)
    return backbone


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (N, 77): padded and cut to the tokenizer's length, as SD-Turbo tokenizes captions."""
    max_length = tokenizer.model_max_length
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompt(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]
) -> tuple[torch.Tensor, list[str]]:
    """Token ids -> the text encoder's last hidden state, as SD-Turbo conditions its UNet.

    Args:
        tokenizer: the CLIP tokenizer.
        text_encoder: the CLIP text model.
        prompts: one caption per image.

    Returns:
        (embeddings of shape (N, 77, hidden), the prompts that were cut at 77 tokens).
    """
    max_length = tokenizer.model_max_length
    # verbose=False: transformers' own note ("will result in indexing errors") is wrong here, where ids are cut at 77
    full = tokenizer(prompts, truncation=False, verbose=False).input_ids
    truncated = [p for p, ids in zip(prompts, full) if len(ids) > max_length]
    return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device))[0], truncated
