"""Load the frozen pretrained networks the training losses are measured with: LPIPS (on a VGG16 trunk) and CLIP.

Every loader looks on disk first and, when the weights are missing and the network is off (``HF_HUB_OFFLINE=1``),
fails at once with a one-paragraph ``TurboI2IError`` that names what was looked for, where, and how to provide it.
Each loader has a tiny stand-in with random weights from a fixed seed (``tiny_lpips``, ``tiny_clip``) that needs no
download, for tests and smoke runs.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import lpips
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors import SafetensorError
from torch import nn

from ..errors import BadInputError, TurboI2IError, load_failure
from ..hub import download_first, download_hint, hub_offline
from ..pickles import load_tensor_pickle

# LPIPS trunk name -> the torchvision weights enum its ImageNet weights come from (lpips asks torchvision for
# ``pretrained=True``, which is IMAGENET1K_V1 of these).
LPIPS_TRUNKS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def freeze(module: nn.Module) -> nn.Module:
    """Put a pretrained net in inference mode for good: eval mode (no dropout) and no parameter gradients.

    Args:
        module: the network.

    Returns:
        the same module.
    """
    return module.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------------------- LPIPS


def _trunk_url(net: str) -> str:
    import torchvision.models

    return getattr(torchvision.models, LPIPS_TRUNKS[net]).IMAGENET1K_V1.url


def _lpips_missing_message(net: str, where: str, url: str, cached: Path, reason: str) -> str:
    return (
        f"Could not load the ImageNet weights of the LPIPS {net!r} trunk ({reason}). They were looked for {where}."
        f" To provide them: download {url} once on a machine with a network and copy the file to {cached}, or point"
        f" TORCH_HOME at a folder that holds hub/checkpoints/{cached.name}, or pass path= a local copy of that file;"
        f" with HF_HUB_OFFLINE=1 nothing is downloaded, unset it to let torch hub fetch the file."
    )


def _trunk_checkpoint(net: str, path: str | os.PathLike | None, local_files_only: bool) -> Path:
    url = _trunk_url(net)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if path is not None:
        if not Path(path).is_file():
            raise BadInputError(f"LPIPS trunk weights file {str(path)!r} does not exist.")
        return Path(path)
    if cached.is_file():
        return cached
    where = f"in the torch hub cache as {cached} (torch.hub.get_dir()/checkpoints, moved by TORCH_HOME)"
    if local_files_only:  # fail fast instead of waiting on a network that is not there
        raise TurboI2IError(_lpips_missing_message(net, where, url, cached, "not in the cache and offline"))
    try:
        torch.hub.load_state_dict_from_url(url, model_dir=str(cached.parent), map_location="cpu", check_hash=True)
    except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError; a bad hash a RuntimeError
        raise TurboI2IError(_lpips_missing_message(net, where, url, cached, load_failure(error))) from error
    return cached


def _copy_trunk(trunk: nn.Module, checkpoint: Path, net: str) -> None:
    """Copy torchvision ``features.<i>.*`` weights into lpips' slices, whose layers keep torchvision's indices."""
    try:
        state = load_tensor_pickle(checkpoint)
        trunk.load_state_dict({name: state["features." + name.split(".", 1)[1]] for name in trunk.state_dict()})
    # refused pickles and damaged safetensors too
    except (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError, SafetensorError) as error:
        url = _trunk_url(net)
        # a damaged or hostile file is bad input (exit 2), as a damaged model file is; a missing one is not
        raise BadInputError(
            f"{checkpoint} is not a readable copy of the ImageNet weights of the LPIPS {net!r} trunk (unreadable:"
            f" {load_failure(error)}); download {url} again and use that copy."
        ) from error


def load_lpips(
    net: str = "vgg",
    pretrained: bool = True,
    path: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> lpips.LPIPS:
    """The LPIPS perceptual distance (Zhang et al. 2018), frozen.

    Its calibrated linear heads ship inside the ``lpips`` wheel; only the ImageNet trunk (torchvision's VGG16 for
    ``net="vgg"``, as pix2pix-Turbo uses) is a download, cached by torch hub under ``torch.hub.get_dir()/checkpoints``.

    Args:
        net: the trunk, one of ``LPIPS_TRUNKS`` ("vgg", "alex", "squeeze").
        pretrained: load the ImageNet trunk weights; False keeps a random trunk (no download; not a meaningful
            perceptual distance, for smoke runs only).
        path: a local copy of torchvision's trunk checkpoint (e.g. ``vgg16-397923af.pth``) to use instead of the cache.
        local_files_only: never download (defaults to the ``HF_HUB_OFFLINE`` setting).

    Returns:
        an ``lpips.LPIPS`` in eval mode with ``requires_grad`` off; call it as ``net(x, y)`` on images in [-1, 1] to
        get an (N, 1, 1, 1) distance.

    Raises:
        BadInputError: unknown ``net``, a ``path`` that does not exist, or a weights file that cannot be read.
        TurboI2IError: the trunk weights are neither on disk nor downloadable, with how to provide them.
    """
    if net not in LPIPS_TRUNKS:
        raise BadInputError(f"Unknown LPIPS trunk {net!r}; choose one of {', '.join(LPIPS_TRUNKS)}.")
    checkpoint = None
    if pretrained or path is not None:  # resolve the file before the slow model build, so a miss fails fast
        offline = hub_offline() if local_files_only is None else local_files_only
        checkpoint = _trunk_checkpoint(net, path, offline)
    with warnings.catch_warnings():  # lpips passes torchvision the deprecated ``pretrained=`` argument
        warnings.simplefilter("ignore", UserWarning)
        # pnet_rand: build the trunk without torchvision's own download; the weights are copied in below.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if checkpoint is not None:
        _copy_trunk(model.net, checkpoint, net)
    return freeze(model)


class TinyLPIPS(nn.Module):
    """An LPIPS-shaped stand-in with random weights: three small conv stages, unit-normalised features, squared
    differences weighted by non-negative 1x1 heads, averaged over space and summed over stages.

    Same call as ``lpips.LPIPS``: ``(x, y) -> (N, 1, 1, 1)`` for images in [-1, 1]; zero for identical inputs and
    never negative. Built in milliseconds, so tests can use it where the real VGG16 trunk would take seconds.

    Args:
        channels: output channels of the three stages.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        self.scaling_layer = lpips.ScalingLayer()  # the same ImageNet shift/scale LPIPS applies
        stages, in_channels = [], 3
        for i, out_channels in enumerate(channels):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.ReLU()))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        with torch.no_grad():
            for lin in self.lins:
                lin.weight.abs_()  # LPIPS' heads are non-negative, so the distance is too

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        """Perceptual distance of two batches in [-1, 1] -> (N, 1, 1, 1)."""
        x, y = self.scaling_layer(in0), self.scaling_layer(in1)
        total = 0
        for stage, lin in zip(self.stages, self.lins):
            x, y = stage(x), stage(y)
            diff = (lpips.normalize_tensor(x) - lpips.normalize_tensor(y)) ** 2
            total = total + lin(diff).mean(dim=(2, 3), keepdim=True)
        return total


def tiny_lpips(seed: int = 0) -> TinyLPIPS:
    """A frozen ``TinyLPIPS`` with random weights from ``seed`` (no download, the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyLPIPS()
    return freeze(model)


# ----------------------------------------------------------------------------------------------------------- CLIP


def _clip_missing_message(name: str, pretrained: str, looked_for: str, reason: str, hint: str) -> str:
    return (
        f"Could not load the CLIP weights {name!r} / {pretrained!r} ({reason}). They were looked for {looked_for}."
        f" To provide them: {hint}, or pass path= a local open_clip checkpoint file (.safetensors, .bin or .pt)"
        f" for {name!r}; with HF_HUB_OFFLINE=1 nothing is downloaded, unset it to let open_clip fetch the weights."
    )


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    # open_clip writes "org/repo/filename" or "org/repo/" (its default file); a .safetensors twin is preferred.
    repo_id, filename = os.path.split(hf_hub)
    if not filename:
        return repo_id, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return repo_id, [filename[:-4] + ".safetensors", filename]
    return repo_id, [filename]


def _clip_from_hf(name: str, tag: str, hf_hub: str, offline: bool) -> str:
    repo_id, filenames = _hf_candidates(hf_hub)
    found, looked_for, reason = download_first(repo_id, filenames, offline)
    if found is None:
        raise TurboI2IError(_clip_missing_message(name, tag, looked_for, reason, download_hint(repo_id)))
    return found


def _clip_from_url(name: str, tag: str, url: str, offline: bool) -> str:
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)  # open_clip's own download folder
    if cached.is_file():
        return str(cached)
    if offline:
        hint = f"download {url} once on a machine with a network and copy it to {cached}"
        raise TurboI2IError(_clip_missing_message(name, tag, f"as {cached}", "not cached and offline", hint))
    return tag  # open_clip downloads it into that folder


def _clip_source(name: str, tag: str, offline: bool) -> str:
    """The ``pretrained=`` value for open_clip: a local file when the tag's weights are (or can be put) on disk."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise BadInputError(f"Unknown open_clip pretrained tag {tag!r} for {name!r}; known tags: {tags}.")
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub"):
        return _clip_from_hf(name, tag, cfg["hf_hub"], offline)
    return _clip_from_url(name, tag, cfg["url"], offline)


def load_clip(
    name: str = "ViT-B-32",
    pretrained: str | None = "openai",
    path: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> tuple[nn.Module, open_clip.tokenizer.SimpleTokenizer]:
    """An open_clip model and its tokenizer, frozen (pix2pix-Turbo's CLIP-similarity loss uses OpenAI's ViT-B/32).

    Args:
        name: an open_clip model name (``open_clip.list_models()``).
        pretrained: an open_clip pretrained tag for ``name`` ("openai"); it also sets the activation (OpenAI's
            weights need QuickGELU) and the image mean/std. None with no ``path``: random weights.
        path: a local checkpoint file to load instead of downloading the tag's weights (``pretrained`` still says
            what they are).
        local_files_only: never download (defaults to the ``HF_HUB_OFFLINE`` setting).

    Returns:
        (model in eval mode with ``requires_grad`` off, tokenizer: list of captions -> (N, 77) token ids).

    Raises:
        BadInputError: unknown model name or tag, a ``path`` that does not exist, or a file that cannot be read.
        TurboI2IError: the weights are neither on disk nor downloadable, with how to provide them.
    """
    if name not in open_clip.list_models():
        raise BadInputError(f"Unknown open_clip model {name!r}; see open_clip.list_models() (e.g. 'ViT-B-32').")
    if path is not None and not Path(path).is_file():
        raise BadInputError(f"CLIP checkpoint file {str(path)!r} does not exist.")
    offline = hub_offline() if local_files_only is None else local_files_only
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if path is not None:
        source = str(path)
    elif pretrained:
        source = _clip_source(name, pretrained, offline)
    else:
        source = None
    try:
        model = open_clip.create_model(
            name,
            pretrained=source,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            # Loading from a file skips open_clip's per-tag preprocessing, so pass the tag's on.
            force_preprocess_cfg={
                k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
            },
        )
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
        if source is not None and Path(source).is_file():  # a damaged or hostile file: bad input (exit 2)
            looked_for, hint, kind = (
                f"in the file {source}",
                f"check that it is an open_clip checkpoint of {name!r}",
                BadInputError,
            )
        else:
            looked_for, hint, kind = "by open_clip's download of the tag", "check the network", TurboI2IError
        raise kind(_clip_missing_message(name, str(pretrained), looked_for, load_failure(error), hint)) from error
    return freeze(model), tokenizer


def tiny_clip(seed: int = 0) -> tuple[open_clip.CLIP, open_clip.tokenizer.SimpleTokenizer]:
    """A tiny random open_clip ``CLIP`` (embed dim 32; ViT: 2 blocks of width 32, patch 8, 64 px; text: 2 blocks of
    width 32) and the real CLIP tokenizer (its BPE vocabulary ships inside open-clip-torch).

    Args:
        seed: weights come from this seed; the caller's RNG is left untouched.

    Returns:
        (frozen model, tokenizer).
    """
    vision = open_clip.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=64)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
    return freeze(model), open_clip.get_tokenizer("ViT-B-32")


def clip_image_input(images: torch.Tensor, visual: nn.Module) -> torch.Tensor:
    """Turn generator outputs into what a CLIP image tower expects, differentiably.

    Args:
        images: (N, 3, H, W) in [-1, 1].
        visual: the CLIP image tower (``model.visual``); its ``image_size`` and ``preprocess_cfg`` mean/std are used
            (OpenAI's mean/std when it has none).

    Returns:
        (N, 3, S, S) resized to the tower's size (bicubic, antialiased) and normalised, in the tower's dtype.
    """
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN), device=images.device, dtype=images.dtype)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD), device=images.device, dtype=images.dtype)
    size = tuple(visual.image_size) if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    x = images * 0.5 + 0.5
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    x = (x - mean[:, None, None]) / std[:, None, None]
    return x.to(next(visual.parameters()).dtype)
