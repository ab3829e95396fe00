"""The generator's configuration: one dataclass, saved as ``config.json`` beside the weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import UNET_LORA_TARGETS, UNPAIRED_UNET_PATTERNS, VAE_LORA_TARGETS
from .backbone import DEFAULT_BACKBONE
from .errors import BadInputError

FORMAT_VERSION = 1
TASKS = ("paired", "unpaired")
INPUT_RANGES = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0)}
PREPROCESSORS = ("canny", "sketch")


@dataclass
class GeneratorConfig:
    """What a one-step generator is: its backbone, its adapters and how it is called by default.

    Args:
        base_model: backbone hub id, local folder or built-in name.
        task: "paired" (pix2pix-Turbo, one direction "a2b") or "unpaired" (CycleGAN-Turbo, "a2b" and "b2a").
        stochastic: conv_in is a blend of the pretrained and the trained conv, steered by r (sketch model).
        unet_lora_rank, unet_lora_alpha: UNet LoRA rank and alpha (update scaled by alpha / rank).
        unet_lora_targets: paired: module-name suffixes; unpaired: substrings of parameter names.
        vae_lora_rank, vae_lora_alpha, vae_lora_targets: the same for the VAE (suffixes).
        train_all: every backbone weight is trained and saved (the paper's "random init" setting).
        input_range: the value range the model expects its input image in: "0,1" (paired) or "-1,1" (unpaired).
        prompts: default caption per direction.
        default_direction: the direction used when a call names none.
        default_r: the r used when a call names none (stochastic models only).
        preprocess: how a raw picture is turned into the model's input by default: "canny", "sketch" or None.
    """

    base_model: str = DEFAULT_BACKBONE
    task: str = "paired"
    stochastic: bool = False
    unet_lora_rank: int = 8
    unet_lora_alpha: float = 8.0
    unet_lora_targets: list[str] | None = None
    vae_lora_rank: int = 4
    vae_lora_alpha: float = 8.0
    vae_lora_targets: list[str] = field(default_factory=lambda: list(VAE_LORA_TARGETS))
    train_all: bool = False
    input_range: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_direction: str = "a2b"
    default_r: float | None = None
    preprocess: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BadInputError(f"Unknown task {self.task!r}; expected one of {', '.join(TASKS)}.")
        if self.unet_lora_targets is None:
            self.unet_lora_targets = list(UNET_LORA_TARGETS if self.task == "paired" else UNPAIRED_UNET_PATTERNS)
        if self.input_range is None:
            self.input_range = "0,1" if self.task == "paired" else "-1,1"
        if self.input_range not in INPUT_RANGES:
            raise BadInputError(
                f"Unknown input_range {self.input_range!r}; expected one of {', '.join(INPUT_RANGES)}."
            )
        if self.stochastic and self.task != "paired":
            raise BadInputError("Only paired models can be stochastic.")
        if self.train_all and (self.stochastic or self.task != "paired"):
            raise BadInputError("train_all (every weight trained) is for deterministic paired models only.")
        if self.default_direction not in self.directions:
            raise BadInputError(f"default_direction {self.default_direction!r} is not one of {self.directions}.")
        if self.preprocess is not None and self.preprocess not in PREPROCESSORS:
            raise BadInputError(f"Unknown preprocess {self.preprocess!r}; expected one of {PREPROCESSORS} or null.")

    @property
    def directions(self) -> tuple[str, ...]:
        """The translation directions the model has (one VAE adapter set and skip convs each)."""
        return ("a2b",) if self.task == "paired" else ("a2b", "b2a")

    def to_dict(self) -> dict:
        """A JSON-ready dict, with the format version."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> GeneratorConfig:
        """Build from ``to_dict``'s output; unknown keys or a newer format are errors, not silently dropped."""
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise BadInputError(f"Checkpoint format {version} is newer than this turbo-i2i reads ({FORMAT_VERSION}).")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"Unknown keys in the model config: {', '.join(unknown)}.")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write ``config.json``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GeneratorConfig:
        """Read ``config.json``."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise BadInputError(f"Cannot read the model config {path}: {error}") from error
