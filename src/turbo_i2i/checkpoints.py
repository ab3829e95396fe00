"""Checkpoints: our format (``config.json`` + ``model.safetensors``) and import of the official img2img-turbo pickles.

Our format holds every trained tensor (LoRA adapters, skip convs, the UNet's conv_in; everything with
``train_all``) under the generator's own parameter names, so a save / load round trip is bit-exact. The official
pickles are read with ``torch.load(weights_only=True)`` only: no pickled code is ever run.

Model files may come from anyone, so loading checks before it trusts: ``config.json`` field names and types
(``GeneratorConfig.from_dict``), where its ``base_model`` points (``resolve_base_model``), and every tensor's type,
dtype, values (finite), name and shape; the first problem is raised as ``BadInputError``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import UNPAIRED_UNET_ADAPTERS
from .backbone import BUILTIN_BACKBONES, Backbone, load_backbone
from .config import GeneratorConfig, check_hub_id
from .errors import BadInputError, TurboI2IError, load_failure
from .generator import OneStepGenerator
from .hub import hub_offline
from .pickles import load_tensor_pickle

logger = logging.getLogger("turbo_i2i")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_ENCODER_NAME = "text_encoder.safetensors"
OFFICIAL_LORA_ALPHA = 8.0  # the release never set lora_alpha, so peft's default of the time applied (except below)
# Weights are stored in these (what we write: float32; half precision is harmless). Integers, bools or float64 in a
# model file mean it is not one of ours, or is damaged.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_generator(
    config: GeneratorConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backbone_path: str | None = None,
) -> tuple[OneStepGenerator, Backbone]:
    """Load the backbone named by ``config.base_model`` and wrap it into a fresh generator.

    Args:
        config: the generator config.
        device: where to put it (CPU when None).
        dtype: weight dtype.
        backbone_path: load the backbone from here instead (``resolve_base_model``'s answer); the config keeps its own
            ``base_model``, so a model saved again points where it pointed before.

    Returns:
        (generator, backbone); the backbone's UNet and VAE are the generator's (not copies).
    """
    backbone = load_backbone(backbone_path or config.base_model, device=device, dtype=dtype)
    generator = OneStepGenerator(config, backbone.unet, backbone.vae, backbone.schedule)
    return generator.to(device=device, dtype=dtype).eval(), backbone


def save_pretrained(
    generator: OneStepGenerator, folder: str | Path, text_encoder: torch.nn.Module | None = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (every trained tensor) into ``folder``.

    Args:
        generator: the model to save.
        folder: destination folder (created if needed).
        text_encoder: also save these text-encoder weights; required for models trained from scratch
            (``train_all``), which keep their whole backbone, so that a change in a library's weight init can never
            alter them (for a loaded one: the text encoder of the backbone ``load_pretrained`` returned with it).

    Returns:
        the folder.

    Raises:
        ValueError: a ``train_all`` model without its text encoder (it would reload with another one).
    """
    if generator.config.train_all and text_encoder is None:
        raise ValueError("This model was trained from scratch (train_all): pass its text_encoder to save it with it.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator.config.save(folder / CONFIG_NAME)
    tensors = {name: t.cpu() for name, t in generator.trained_state_dict().items()}
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt", "library": "turbo-i2i"})
    readable_like_other_files(folder / WEIGHTS_NAME)
    if text_encoder is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()}
        save_file(state, folder / TEXT_ENCODER_NAME, metadata={"format": "pt", "library": "turbo-i2i"})
        readable_like_other_files(folder / TEXT_ENCODER_NAME)
    return folder


def _process_umask() -> int:
    mask = os.umask(0)  # reading it means setting it; set back at once (at import: no other thread writes yet)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def readable_like_other_files(path: str | Path) -> None:
    """Give a file safetensors wrote the permissions of any other new file (``0o666`` less the umask).

    safetensors (0.8) creates its files readable by their owner only, so a model exported on a shared machine could
    not be read by the colleagues it was made for.

    Args:
        path: the file, changed in place.
    """
    try:
        os.chmod(path, 0o666 & ~_UMASK)
    except OSError:  # a file system without Unix permissions (CIFS, some FUSE mounts): nothing to widen
        pass


def resolve_base_model(base_model: str, folder: str | Path, given: str | os.PathLike | None = None) -> str:
    """Where the backbone named by a model folder's ``config.json`` may be loaded from.

    A model folder may come from anyone, so its ``base_model`` may name only:

    - a built-in backbone (``tiny``, ``tiny-circles``, ...);
    - a relative path to a folder *inside the model folder* (resolved against it, symlinks included; ``..`` that
      leaves it is refused);
    - a hub id ``owner/name``, validated before any cache lookup or download.

    An absolute path (or anything else) is refused: it would make a downloaded model load files from anywhere on the
    machine. A backbone the user passes themselves (``given``) is trusted as it is, absolute path or not.

    Args:
        base_model: the config's ``base_model``.
        folder: the model folder the config came from.
        given: a backbone the user named explicitly; it wins over the config's.

    Returns:
        what to pass to ``load_backbone``.

    Raises:
        BadInputError: ``base_model`` breaks these rules; the message says how to pass a backbone explicitly.
    """
    if given is not None:
        return str(given)
    if base_model in BUILTIN_BACKBONES:
        return base_model
    root = Path(folder).resolve()
    how = (
        "If you trust it, pass the backbone yourself: --base-model PATH on the command line,"
        " Translator.from_pretrained(folder, base_model=...) in Python."
    )
    if not base_model or Path(base_model).is_absolute() or base_model.startswith("~"):
        raise BadInputError(
            f"{Path(folder) / CONFIG_NAME} names its base model by the path {base_model!r}: a model folder may only"
            f" name a built-in backbone, a folder inside itself or a hub id. {how}"
        )
    inside = (root / base_model).resolve()
    if (root / base_model).exists() or ".." in Path(base_model).parts:
        if not inside.is_relative_to(root):
            raise BadInputError(
                f"{Path(folder) / CONFIG_NAME} names its base model {base_model!r}, which leads outside the model"
                f" folder ({inside}). {how}"
            )
        return str(inside)
    return check_hub_id(base_model, f"The base model of {Path(folder) / CONFIG_NAME},")


def check_tensors(tensors: dict, source: str | Path) -> None:
    """Refuse values that are not weights: non-tensors, integer/bool/float64 dtypes, NaN or Inf.

    Runs before any backbone is loaded, so a damaged file fails at once; names and shapes are checked later against
    the model (``OneStepGenerator.check_trained_state_dict``).

    Args:
        tensors: name -> value, as read from a file.
        source: the file, for the message.

    Raises:
        BadInputError: the first offending entry (in name order).
    """
    for name in sorted(tensors, key=str):
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            raise BadInputError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor.")
        if value.dtype not in WEIGHT_DTYPES:
            raise BadInputError(
                f"{source}: tensor {name!r} has dtype {str(value.dtype).removeprefix('torch.')}; model weights are"
                f" float32, float16 or bfloat16. The file is not a turbo-i2i model or is damaged."
            )
        if not bool(torch.isfinite(value).all()):
            raise BadInputError(f"{source}: tensor {name!r} holds NaN or Inf values; the file is damaged.")


def check_ranks(config: GeneratorConfig, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse LoRA ranks the file's own tensors contradict, before the generator is built with them.

    The adapters are built from the config's ranks (up to 4096) before the tensors are loaded into them: a file
    claiming rank 4096 would make the loader allocate tens of GB of adapters for a few MB of weights.

    Args:
        config: the model's config, as read.
        tensors: its trained tensors under our names (``unet.`` / ``vae.<direction>.``).
        source: the file, for the message.

    Raises:
        BadInputError: a ``lora_A`` tensor of another rank, or no LoRA tensor for a part that has adapters (all but
            ``train_all`` models).
    """
    ranks = {"unet": config.unet_lora_rank, "vae": config.vae_lora_rank}
    targets = {"unet": config.unet_lora_targets, "vae": config.vae_lora_targets}
    found = dict.fromkeys(ranks, False)
    for name, value in tensors.items():
        if ".lora_A." not in name:
            continue
        part = name.partition(".")[0]
        if part in ranks and value.ndim and value.shape[0] != ranks[part]:
            raise BadInputError(
                f"{source}: tensor {name!r} has LoRA rank {value.shape[0]}, but the model declares"
                f" {part}_lora_rank={ranks[part]}; the file is damaged or was edited."
            )
        found[part] = True
    # a train_all model has no adapters (every weight is trained instead)
    missing = [part for part in ranks if targets[part] and not found[part] and not config.train_all]
    if missing:
        raise BadInputError(f"{source} holds no LoRA weights for the {' and the '.join(missing)}; it is damaged.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error type for a damaged header or a truncated file
        raise BadInputError(f"Cannot read {path}: it is truncated or not a safetensors file ({error}).") from error


def load_pretrained(
    folder: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    base_model: str | os.PathLike | None = None,
) -> tuple[OneStepGenerator, Backbone]:
    """Load a model saved by ``save_pretrained``, checking everything it reads (see the module docstring).

    Args:
        folder: a folder holding ``config.json`` and ``model.safetensors``.
        device: where to put it.
        dtype: weight dtype.
        base_model: load this backbone instead of the one ``config.json`` names (the user's own choice, trusted:
            the way to use a backbone at an absolute path, see ``resolve_base_model``).

    Returns:
        (generator, backbone).

    Raises:
        BadInputError: a missing, unreadable or invalid file, naming the first problem found.
    """
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise BadInputError(f"{folder} is not a turbo-i2i model folder: {name} is missing.")
    config = GeneratorConfig.load(folder / CONFIG_NAME)
    backbone_path = resolve_base_model(config.base_model, folder, base_model)
    state = _read_safetensors(folder / WEIGHTS_NAME)
    check_tensors(state, folder / WEIGHTS_NAME)
    text_state = None
    if (folder / TEXT_ENCODER_NAME).is_file():
        text_state = _read_safetensors(folder / TEXT_ENCODER_NAME)
        check_tensors(text_state, folder / TEXT_ENCODER_NAME)
    check_ranks(config, state, folder / WEIGHTS_NAME)
    generator, backbone = build_generator(config, device, dtype, backbone_path)
    generator.load_trained_state_dict(state)
    if text_state is not None:
        try:
            backbone.text_encoder.load_state_dict(text_state)
        except RuntimeError as error:  # names or shapes that do not fit
            first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
            raise BadInputError(f"{folder / TEXT_ENCODER_NAME} does not fit {config.base_model!r}: {first}") from error
    return generator, backbone


# --- official img2img-turbo checkpoints ----------------------------------------------------------------------------

PAIRED_KEYS = ("rank_unet", "rank_vae", "unet_lora_target_modules", "vae_lora_target_modules", "state_dict_unet",
               "state_dict_vae")  # fmt: skip
UNPAIRED_KEYS = ("rank_unet", "rank_vae", "vae_lora_target_modules", "sd_encoder", "sd_decoder", "sd_other")
UNPAIRED_VAE_PREFIXES = {"vae.": "a2b", "vae_b2a.": "b2a"}


def read_official(path: str | Path) -> dict:
    """Read an official pickle as plain tensors / lists / numbers, never executing pickled code.

    Args:
        path: the ``.pkl`` file.

    Returns:
        the checkpoint dict.
    """
    if Path(path).suffix == ".safetensors":  # what turbo-i2i itself writes
        raise BadInputError(
            f"{path} is a safetensors file, as turbo-i2i's own models hold, not an official .pkl: a turbo-i2i model"
            " needs no converting; pass its folder as the model."
        )
    try:
        state = load_tensor_pickle(path)
    except FileNotFoundError as error:
        raise BadInputError(f"{path} does not exist.") from error
    except Exception as error:  # weights_only refuses anything but tensors and plain containers
        raise BadInputError(
            f"{path} is not a safe-to-load img2img-turbo checkpoint (torch.load with weights_only=True refused it:"
            f" {load_failure(error)}); it was not loaded."
        ) from error
    if not isinstance(state, dict):
        raise BadInputError(f"{path} does not hold a checkpoint dict.")
    return state


def _with_adapter(key: str, adapter: str) -> str:
    # Unpaired files strip the adapter name: "x.lora_A.weight" -> "x.lora_A.<adapter>.weight".
    return re.sub(r"\.(lora_[AB])\.", rf".\1.{adapter}.", key)


def _require(state: dict, keys: tuple[str, ...], kind: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise BadInputError(f"Not an official {kind} img2img-turbo checkpoint: it lacks {', '.join(missing)}.")


def official_to_ours(state: dict, base_model: str) -> tuple[GeneratorConfig, dict[str, torch.Tensor], frozenset]:
    """Map an official checkpoint onto our config and parameter names.

    Args:
        state: the dict ``read_official`` returns.
        base_model: the backbone it was trained on (SD-Turbo for the released models).

    Returns:
        (config, tensors under our names, names that keep the backbone's values: the unpaired UNet conv_in, whose
        base weights the official files do not store).
    """
    if "state_dict_unet" in state:
        _require(state, PAIRED_KEYS, "paired")
        unet_state = state["state_dict_unet"]
        config = GeneratorConfig(
            base_model=base_model,
            task="paired",
            stochastic=any("conv_in_curr" in k for k in unet_state),
            unet_lora_rank=int(state["rank_unet"]),
            unet_lora_alpha=OFFICIAL_LORA_ALPHA,
            unet_lora_targets=list(state["unet_lora_target_modules"]),
            vae_lora_rank=int(state["rank_vae"]),
            vae_lora_alpha=OFFICIAL_LORA_ALPHA,
            vae_lora_targets=list(state["vae_lora_target_modules"]),
        )
        # conv_in_pretrained is the frozen SD-Turbo conv the stochastic blend starts from: it comes from the backbone.
        tensors = {f"unet.{k}": v for k, v in unet_state.items() if "conv_in_pretrained" not in k}
        tensors.update({f"vae.a2b.{k}": v for k, v in state["state_dict_vae"].items()})
        return config, tensors, frozenset()
    _require(state, UNPAIRED_KEYS, "unpaired")
    rank = int(state["rank_unet"])
    config = GeneratorConfig(
        base_model=base_model,
        task="unpaired",
        unet_lora_rank=rank,
        unet_lora_alpha=float(rank),  # the unpaired recipe sets alpha = rank
        vae_lora_rank=int(state["rank_vae"]),
        vae_lora_alpha=OFFICIAL_LORA_ALPHA,
        vae_lora_targets=list(state["vae_lora_target_modules"]),
    )
    tensors = {}
    for key, adapter in zip(("sd_encoder", "sd_decoder", "sd_other"), UNPAIRED_UNET_ADAPTERS):
        tensors.update({f"unet.{_with_adapter(k, adapter)}": v for k, v in state[key].items()})
    vae_state = next(
        (state[k] for k in ("sd_vae_enc", "sd_vae_dec") if isinstance(state.get(k), dict) and state[k]), None
    )
    if vae_state is None:
        raise BadInputError("Not an official unpaired img2img-turbo checkpoint: it lacks sd_vae_enc and sd_vae_dec.")
    for key, value in vae_state.items():
        for prefix, direction in UNPAIRED_VAE_PREFIXES.items():
            # The files repeat the whole frozen VAE; only adapters and skip convs are trained.
            if key.startswith(prefix) and ("lora_" in key or ".skip_conv_" in key):
                tensors[f"vae.{direction}.{key.removeprefix(prefix)}"] = value
    conv_in_base = frozenset({"unet.conv_in.base_layer.weight", "unet.conv_in.base_layer.bias"})
    return config, tensors, conv_in_base


def fit_base_layer_names(tensors: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """Accept both spellings of a LoRA-wrapped weight: older peft wrote ``x.weight``, newer ``x.base_layer.weight``.

    Args:
        tensors: checkpoint tensors.
        names: the model's parameter names.

    Returns:
        the tensors, renamed where only the ``base_layer`` spelling exists in the model.
    """
    fitted = {}
    for key, value in tensors.items():
        if key not in names:
            stem, _, leaf = key.rpartition(".")
            if f"{stem}.base_layer.{leaf}" in names:
                key = f"{stem}.base_layer.{leaf}"
        fitted[key] = value
    return fitted


def load_official(
    path: str | Path,
    base_model: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backbone_path: str | os.PathLike | None = None,
    **config_overrides,
) -> tuple[OneStepGenerator, Backbone]:
    """Build a generator from an official img2img-turbo pickle.

    Args:
        path: the ``.pkl`` file.
        base_model: the backbone its config names (``stabilityai/sd-turbo`` for the released models).
        device: where to put it.
        dtype: weight dtype.
        backbone_path: load the backbone from here instead of ``base_model`` (a local copy of it).
        **config_overrides: config fields the file does not carry (default prompts, direction, r, preprocess);
            ``task`` and ``stochastic``, which the file decides, are checked instead (a named model's expectation).

    Returns:
        (generator, backbone).

    Raises:
        BadInputError: not an official checkpoint, bad tensors, or a file of another kind than ``task`` /
            ``stochastic`` say.
    """
    state = read_official(path)
    try:
        config, tensors, from_backbone = official_to_ours(state, base_model)
    except BadInputError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as error:  # e.g. a list where a rank belongs
        raise BadInputError(
            f"{path} is not an official img2img-turbo checkpoint: {type(error).__name__}: {error}."
        ) from error
    check_tensors(tensors, path)
    expected = {key: config_overrides.pop(key) for key in ("task", "stochastic") if key in config_overrides}
    if any(getattr(config, key) != value for key, value in expected.items()):
        wanted = _kind(expected.get("task", config.task), expected.get("stochastic", False))
        found = _kind(config.task, config.stochastic)
        raise BadInputError(
            f"{path} holds {'an' if found[0] in 'aeiou' else 'a'} {found} model, not the {wanted} one its file name"
            " or --name says; rename the file, or pass the name of the model it is."
        )
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.__post_init__()  # re-validate after the overrides
    check_ranks(config, tensors, path)
    try:
        generator, backbone = build_generator(config, device, dtype, backbone_path)
    except BadInputError:
        raise
    except ValueError as error:  # peft: a LoRA target that names no module of the backbone
        raise BadInputError(f"{path}: its LoRA targets do not fit the backbone ({error}).") from error
    names = {n for n, _ in generator.named_parameters()}
    tensors = fit_base_layer_names(tensors, names)
    generator.load_trained_state_dict(tensors, allow_missing=from_backbone | absent_lora_pairs(tensors, names))
    return generator, backbone


def _kind(task: str, stochastic: bool) -> str:
    return f"{'stochastic ' if stochastic else ''}{task}"


def absent_lora_pairs(tensors: dict[str, torch.Tensor], names: set[str]) -> frozenset[str]:
    """LoRA parameters of modules for which a file holds neither A nor B.

    A diffusers release can name or add a module the released files never adapted; such a module keeps a fresh
    adapter whose B is zero, which leaves its output exactly as without LoRA, so its absence is not an error.

    Args:
        tensors: checkpoint tensors under our names.
        names: the model's parameter names.

    Returns:
        the names that may be missing.
    """
    present = {key.split(".lora_")[0] for key in tensors if ".lora_" in key}
    absent = frozenset(n for n in names if ".lora_" in n and n.split(".lora_")[0] not in present)
    if absent:
        logger.info("%d LoRA'd modules have no weights in the file and stay unchanged.", len(absent) // 2)
    return absent


def convert_official(
    path: str | Path,
    out: str | Path,
    base_model: str,
    backbone_path: str | os.PathLike | None = None,
    **config_overrides,
) -> Path:
    """Turn an official pickle into our format (the UNet conv_in of unpaired models is taken from the backbone).

    Args:
        path: the ``.pkl`` file.
        out: the destination folder; must not exist yet, so nothing is overwritten.
        base_model: the backbone it was trained on, as the new model's config names it.
        backbone_path: read that backbone from here (a local copy; a model folder cannot name a path outside it).
        **config_overrides: see ``load_official``.

    Returns:
        the destination folder.
    """
    out = Path(out)
    if out.exists():
        raise BadInputError(f"{out} already exists; choose a new folder.")
    generator, _ = load_official(path, base_model, backbone_path=backbone_path, **config_overrides)
    return save_pretrained(generator, out)


def download(url: str, destination: Path) -> Path:
    """Download ``url`` to ``destination`` once (cached), with a progress bar; atomic, so no half file remains.

    Args:
        url: the file's address.
        destination: where to keep it.

    Returns:
        the local path.
    """
    if destination.is_file():
        return destination
    hint = f"Download it on a machine with a network and place it at {destination}."
    if hub_offline():
        raise TurboI2IError(f"{url} is not in the cache and HF_HUB_OFFLINE is set. {hint}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(destination), progress=True)  # writes a temp file, then renames
    except Exception as error:  # urllib raises several unrelated types for "no network"
        raise TurboI2IError(f"Could not download {url}: {error}. {hint}") from error
    return destination
