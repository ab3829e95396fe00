"""The generator's configuration: one dataclass, saved as ``config.json`` beside the weights."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import UNET_LORA_TARGETS, UNPAIRED_UNET_PATTERNS, VAE_LORA_TARGETS
from .backbone import DEFAULT_BACKBONE
from .errors import BadInputError

FORMAT_VERSION = 1
TASKS = ("paired", "unpaired")
INPUT_RANGES = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0)}
PREPROCESSORS = ("canny", "sketch")
STOCHASTIC_DEFAULT_R = 0.4  # the released sketch model's default r, also given to the stochastic models we train
MAX_CONFIG_BYTES = 1 << 20  # a real config.json is about 1 KB; a huge one is not a model config


def check_hub_id(repo_id: object, what: str = "hub id") -> str:
    """Validate a Hugging Face hub id ("owner/name") before it is used for any cache lookup or download.

    Uses ``huggingface_hub``'s own rules (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``; at most 96
    characters per part), and requires the owner, so a name can never be read as a path outside the cache.

    Args:
        repo_id: the id to check.
        what: how to name it in the message.

    Returns:
        the id, unchanged.

    Raises:
        BadInputError: it is not a valid "owner/name" hub id.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise BadInputError(f"{what} {repo_id!r} is not a hub id of the form owner/name.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise BadInputError(f"{what} {repo_id!r} is not a valid hub id: {str(error).splitlines()[0]}") from error
    return repo_id


def _matches(value: object, hint: object) -> bool:
    """Whether a JSON value fits a (simple) type annotation: bool/int/float/str, list[X], dict[K, V], X | None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # JSON true/false are not ranks
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 8.0 as 8 when it was produced elsewhere
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return False


def _type_name(hint: object) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


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
        for name in ("unet_lora_targets", "vae_lora_targets"):
            targets = getattr(self, name)
            if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
                raise BadInputError(f"{name} must be a list of module names, got {targets!r}.")
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
        for name in ("unet_lora_rank", "vae_lora_rank"):
            value = getattr(self, name)
            if isinstance(value, int) and not 1 <= value <= 4096:
                raise BadInputError(f"{name} must be between 1 and 4096, got {value}.")
        for name in ("unet_lora_alpha", "vae_lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
                raise BadInputError(f"{name} must be a positive number, got {value}.")
        if isinstance(self.default_r, (int, float)) and not 0 <= self.default_r <= 1:
            raise BadInputError(f"default_r must be in [0, 1], got {self.default_r}.")

    @property
    def directions(self) -> tuple[str, ...]:
        """The translation directions the model has (one VAE adapter set and skip convs each)."""
        return ("a2b",) if self.task == "paired" else ("a2b", "b2a")

    def to_dict(self) -> dict:
        """A JSON-ready dict, with the format version."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> GeneratorConfig:
        """Build from ``to_dict``'s output, as read from a file that may come from anyone.

        Unknown keys, a newer format and a value of the wrong JSON type (a string rank, a number as a prompt) are
        errors naming the first offending key, never silently dropped or passed on.

        Args:
            data: the parsed ``config.json``.

        Returns:
            the config.

        Raises:
            BadInputError: the first problem found.
        """
        if not isinstance(data, dict):
            raise BadInputError(f"The model config must be a JSON object, got a {type(data).__name__}.")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise BadInputError(f"The model config's format_version must be an integer, got {version!r}.")
        if version > FORMAT_VERSION:
            raise BadInputError(f"Checkpoint format {version} is newer than this turbo-i2i reads ({FORMAT_VERSION}).")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"Unknown keys in the model config: {', '.join(unknown)}.")
        hints = typing.get_type_hints(cls)
        for name in sorted(data):
            if not _matches(data[name], hints[name]):
                raise BadInputError(
                    f"The model config's {name} must be {_type_name(hints[name])}, got {data[name]!r}"
                    f" ({type(data[name]).__name__})."
                )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write ``config.json``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GeneratorConfig:
        """Read ``config.json`` (see ``from_dict`` for what is refused).

        Args:
            path: the file.

        Returns:
            the config.

        Raises:
            BadInputError: the file cannot be read, is not JSON, is over 1 MiB or fails ``from_dict``.
        """
        try:
            if Path(path).stat().st_size > MAX_CONFIG_BYTES:
                raise BadInputError(f"The model config {path} is over {MAX_CONFIG_BYTES} bytes; it is not a config.")
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, TypeError) as error:
            raise BadInputError(f"Cannot read the model config {path}: {error}") from error
