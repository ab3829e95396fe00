"""Named models: the six released img2img-turbo models and the built-in offline demo model.

``load_model`` resolves a name, a model folder, an official ``.pkl`` file or a hub id to a generator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbone import DEFAULT_BACKBONE
from .checkpoints import CONFIG_NAME, WEIGHTS_NAME, download, load_official, load_pretrained
from .config import STOCHASTIC_DEFAULT_R, check_hub_id
from .errors import BadInputError, TurboI2IError
from .hub import hub_cache

OFFICIAL_URL = "https://www.cs.cmu.edu/~img2img-turbo/models/"
BUILTIN_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class NamedModel:
    """A model known by name.

    Args:
        name: the name users type.
        description: one line for ``turbo-i2i models``.
        file: the official pickle's file name (downloaded from ``OFFICIAL_URL``), or None for a built-in folder.
        overrides: config fields the official file does not carry (default prompt, direction, r, preprocess), and
            the ``task`` and ``stochastic`` it must have.
    """

    name: str
    description: str
    file: str | None = None
    overrides: dict = field(default_factory=dict)

    @property
    def builtin_path(self) -> Path:
        return BUILTIN_DIR / self.name


MODELS = {
    m.name: m
    for m in (
        NamedModel("demo-circles", "built-in, offline: white outlines -> filled coloured shapes (64 px)"),
        NamedModel(
            "edge_to_image",
            "pix2pix-Turbo, canny edges -> photo",
            "edge_to_image_loras.pkl",
            {"task": "paired", "stochastic": False, "preprocess": "canny"},
        ),
        NamedModel(
            "sketch_to_image_stochastic",
            "pix2pix-Turbo, sketch -> picture, r trades faithfulness for variety",
            "sketch_to_image_stochastic_lora.pkl",
            {"task": "paired", "stochastic": True, "preprocess": "sketch", "default_r": STOCHASTIC_DEFAULT_R},
        ),
        NamedModel(
            "day_to_night", "CycleGAN-Turbo, driving scenes", "day2night.pkl",
            {"task": "unpaired", "prompts": {"a2b": "driving in the night"}, "default_direction": "a2b"},
        ),
        NamedModel(
            "night_to_day", "CycleGAN-Turbo, driving scenes", "night2day.pkl",
            {"task": "unpaired", "prompts": {"b2a": "driving in the day"}, "default_direction": "b2a"},
        ),
        NamedModel(
            "clear_to_rainy", "CycleGAN-Turbo, driving scenes", "clear2rainy.pkl",
            {"task": "unpaired", "prompts": {"a2b": "driving in heavy rain"}, "default_direction": "a2b"},
        ),
        NamedModel(
            "rainy_to_clear", "CycleGAN-Turbo, driving scenes", "rainy2clear.pkl",
            {"task": "unpaired", "prompts": {"b2a": "driving in the day"}, "default_direction": "b2a"},
        ),
    )
}  # fmt: skip


def official_overrides(path: str | os.PathLike) -> dict:
    """What an official file downloaded by hand gets from the named model published under its file name (default r,
    sketch or canny input, captions, and the kind of model it must be); nothing for another name.

    Args:
        path: the ``.pkl`` file.

    Returns:
        config overrides for ``load_official``.
    """
    named = next((m for m in MODELS.values() if m.file == Path(path).name), None)
    return dict(named.overrides) if named is not None else {}


def cache_dir() -> Path:
    """Where downloaded official checkpoints are kept (``TURBO_I2I_CACHE``, else ``~/.cache/turbo_i2i``)."""
    return Path(os.environ.get("TURBO_I2I_CACHE", Path.home() / ".cache" / "turbo_i2i"))


def availability(model: NamedModel) -> tuple[bool, str]:
    """Whether a named model can be loaded with no network, and why not.

    Returns:
        (available offline, a short reason).
    """
    if model.file is None:
        ok = (model.builtin_path / WEIGHTS_NAME).is_file()
        return ok, "ships with the package" if ok else "weights missing from this install"
    missing = [] if (cache_dir() / model.file).is_file() else [f"a download of {model.file}"]
    if not _backbone_cached():
        missing.append(f"{DEFAULT_BACKBONE} in the hub cache")
    return (False, f"needs {' and '.join(missing)}") if missing else (True, "cached")


def _backbone_cached() -> bool:
    """Whether the default backbone's snapshot is in the local Hugging Face cache (looked up, never downloaded)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(DEFAULT_BACKBONE, local_files_only=True, cache_dir=hub_cache())
    except Exception:  # any failure means "not in the local cache"
        return False
    return True


def check_reference(name_or_path: str | os.PathLike) -> None:
    """Refuse a model reference ``load_model`` could not resolve, without loading anything.

    Raises:
        BadInputError: not a named model, a model folder, an official ``.pkl`` file or the form of a hub id.
    """
    ref, path = str(name_or_path), Path(name_or_path)
    if ref in MODELS or path.is_dir() or (path.is_file() and path.suffix == ".pkl"):
        return
    if not path.exists() and ref.count("/") == 1 and not ref.startswith((".", "/")):
        check_hub_id(ref, "Model")
        return
    raise BadInputError(
        f"Unknown model {ref!r}: not a named model, a model folder, an official .pkl file or a hub id."
        f" Named models: {', '.join(MODELS)}."
    )


def load_model(
    name_or_path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    base_model: str | os.PathLike | None = None,
):
    """Resolve a model reference and load it.

    Args:
        name_or_path: a name from ``MODELS``, a folder saved by ``save_pretrained``, an official ``.pkl`` file, or a
            hub id of a repository in our format (validated before any cache lookup or download).
        device: where to put it.
        dtype: weight dtype.
        base_model: the backbone to load it on instead of the one the model names (trusted: the user's own choice;
            see ``checkpoints.resolve_base_model`` for what a model folder may name by itself).

    Returns:
        (generator, backbone).

    Raises:
        BadInputError: an unknown name, an invalid hub id, or a model file that fails its checks.
        TurboI2IError: a model that must be downloaded and cannot be.
    """
    ref = str(name_or_path)
    if ref in MODELS:
        model = MODELS[ref]
        if model.file is None:
            return load_pretrained(model.builtin_path, device, dtype, base_model=base_model)
        try:
            path = download(OFFICIAL_URL + model.file, cache_dir() / model.file)
        except TurboI2IError as error:
            if base_model is None and not _backbone_cached():  # say so now, not after the user fetched the file
                raise TurboI2IError(
                    f"{error} The model also runs on {DEFAULT_BACKBONE}, which is not in the Hugging Face cache"
                    f" ({hub_cache()}) either: fetch it on a machine with a network (`hf download {DEFAULT_BACKBONE}`)"
                    " and copy the cache over."
                ) from error
            raise
        return load_official(path, base_model or DEFAULT_BACKBONE, device, dtype, **model.overrides)
    path = Path(ref)
    if path.is_dir():
        return load_pretrained(path, device, dtype, base_model=base_model)
    if path.is_file() and path.suffix == ".pkl":
        overrides = official_overrides(path)
        return load_official(path, base_model or DEFAULT_BACKBONE, device, dtype, **overrides)
    check_reference(ref)  # what is left is a hub id, or nothing known
    return load_pretrained(_hub_snapshot(check_hub_id(ref, "Model")), device, dtype, base_model=base_model)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    check_hub_id(repo_id, "Model")  # again here: nothing reaches the cache or the network unvalidated

    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, "*.safetensors"]))
    except GatedRepoError as error:  # a subclass of the next: the repository exists
        raise TurboI2IError(
            f"Model {repo_id!r} is gated on the hub: accept its terms there and log in (`hf auth login`), or pass a"
            f" local copy of it."
        ) from error
    except RepositoryNotFoundError as error:  # the hub answered: there is no such model (or a private one)
        raise BadInputError(
            f"Unknown model {repo_id!r}: no local folder of that name, and no such repository on the hub (or a"
            f" private one: log in with `hf auth login`). Named models: {', '.join(MODELS)}."
        ) from error
    except Exception as error:  # offline, gated, network: "cannot get it now"
        raise TurboI2IError(
            f"Could not get model {repo_id!r} from the hub or its cache ({type(error).__name__}); there is no local"
            f" folder of that name either. Pass a local model folder instead, or download it where a network is"
            f" available. Named models: {', '.join(MODELS)}."
        ) from error
