"""The DINO structure distance: how much a translation changed the layout of its input (Tumanyan et al. 2022,
"Splicing ViT Features for Semantic Appearance Transfer"; used by CycleGAN-Turbo to score unpaired translation).

For an input image and its translation:

1. resize so the shorter side is 224 (the output to exactly the input's resized size), drop the pixels beyond the
   last whole 8 px patch (as DINO's patch convolution does) and normalise with DINO's ImageNet mean/std;
2. run DINO ViT-B/8 and take the keys of the last block's self-attention for every token (the CLS token included),
   all heads concatenated: a (tokens, 768) matrix;
3. build the cosine self-similarity matrix of those keys, (tokens, tokens);
4. the distance is the mean squared difference of the input's and the output's matrices; a set is scored by the mean
   over its images.

The self-similarity of keys describes which parts of the image resemble which, not what they look like, so the
distance ignores appearance (colour, texture, style) and measures structure. Lower is better; 0 for an unchanged
image. Steps 3-4 are pure functions of tensors (``cosine_self_similarity``, ``self_similarity_mse``) so they can be
checked on hand-made matrices.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInputError, TurboI2IError

DINO_MODEL = "vit_base_patch8_224.dino"
DINO_SIZE = 224
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# The shorter side goes to 224 px, so the token count, the ViT's attention and the (tokens, tokens) self-similarity
# matrices grow with the aspect ratio: 4:1 gives 28 x 112 patches (3137 tokens, about 0.5 GB of attention scores); an
# 8 x 512 px strip would give 50,000 tokens and need tens of GB.
MAX_ASPECT_RATIO = 4.0


# --------------------------------------------------------------------------------------------------- pure maths


def check_aspect_ratio(width: int, height: int, name: str) -> None:
    """Refuse an image too elongated for the structure distance (see ``MAX_ASPECT_RATIO``): ``turbo-i2i eval``
    checks its inputs with this before any network loads (the distance itself takes any size, slowly).

    Args:
        width, height: the image's size in pixels.
        name: how the message names the image.

    Raises:
        BadInputError: the longer side is more than ``MAX_ASPECT_RATIO`` times the shorter one.
    """
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadInputError(
            f"{name} is {width}x{height}: the DINO structure distance takes images up to {MAX_ASPECT_RATIO:g} times"
            " longer than wide (its cost grows with the square of the aspect ratio); crop it or leave the metric out."
        )


def cosine_self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token's key with every other's.

    Args:
        keys: (B, N, D) keys, heads concatenated along D.

    Returns:
        (B, N, N) float32 matrices with entries in [-1, 1] (1 on the diagonal for non-zero keys).
    """
    unit = F.normalize(keys.float(), dim=-1)
    return unit @ unit.transpose(-1, -2)


def self_similarity_mse(sim_a: torch.Tensor, sim_b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two self-similarity matrices, per image.

    Args:
        sim_a: (B, N, N) matrices of the inputs.
        sim_b: (B, N, N) matrices of the outputs.

    Returns:
        (B,) distances.

    Raises:
        BadInputError: the shapes differ (the images were not compared on the same token grid).
    """
    if sim_a.shape != sim_b.shape:
        raise BadInputError(
            f"DINO structure: self-similarity shapes {tuple(sim_a.shape)} and {tuple(sim_b.shape)} differ; the two"
            " images must cover the same token grid."
        )
    return ((sim_a - sim_b) ** 2).flatten(1).mean(dim=1)


def structure_distance_from_keys(keys_a: torch.Tensor, keys_b: torch.Tensor) -> torch.Tensor:
    """Steps 3-4 of the distance on keys already extracted.

    Args:
        keys_a: (B, N, D) keys of the inputs.
        keys_b: (B, N, D) keys of the outputs.

    Returns:
        (B,) distances.
    """
    return self_similarity_mse(cosine_self_similarity(keys_a), cosine_self_similarity(keys_b))


# ------------------------------------------------------------------------------------------------------ network


class DINOStructureDistance(nn.Module):
    """The DINO structure distance with a given timm ViT (``load_dino()`` for real numbers, ``tiny_dino()`` in tests).

    Args:
        vit: a timm ``VisionTransformer`` built with ``dynamic_img_size=True`` (images keep their aspect ratio);
            frozen here. It runs where its weights are.
        size: the shorter side images are resized to (224 as in the metric's definition).
    """

    def __init__(self, vit: nn.Module, size: int = DINO_SIZE):
        super().__init__()
        from ..training.pretrained import freeze

        self.vit = freeze(vit)
        self.size = size
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", _IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", _IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DINOStructureDistance:
        """Switch the module's mode; the frozen ViT stays in eval mode."""
        super().train(mode)
        self.vit.eval()
        return self

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) with the shorter side at ``self.size`` and the aspect ratio kept, the longer side cut to
        an int as torchvision's ``Resize(224)`` (the reference preprocessing) does."""
        short = min(height, width)
        return tuple(self.size if side == short else int(self.size * side / short) for side in (height, width))

    def preprocess(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> resized to ``size`` (bilinear, antialiased), cut to whole patches and
        normalised for the ViT.

        The pixels past the last whole patch are dropped, as the reference's stride-8 patch convolution drops them
        (1280x720 -> 224x398 -> 224x392, 28 x 49 patches); timm refuses sizes that are not multiples of the patch.
        """
        x = images.float() * 0.5 + 0.5
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        patch = getattr(getattr(self.vit, "patch_embed", None), "patch_size", 8)
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        x = x[..., : max(ph, x.shape[-2] // ph * ph), : max(pw, x.shape[-1] // pw * pw)]
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(next(self.vit.parameters()).dtype)

    @torch.no_grad()
    def keys(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Keys of the last block's attention for all tokens, heads concatenated.

        Args:
            images: (N, 3, H, W) in [-1, 1].
            size: the (height, width) to resize to; by default the shorter side goes to ``self.size``.

        Returns:
            (N, tokens, embed_dim) float32.
        """
        size = size or self.resized_size(*images.shape[-2:])
        x = self.preprocess(images.to(next(self.vit.parameters()).device), size)
        qkv_layer = self.vit.blocks[-1].attn.qkv
        captured: list[torch.Tensor] = []
        # The hook only reads the projection's output during this call and is removed before returning: the
        # qkv Linear's output is (N, tokens, 3 * dim) laid out as [q | k | v], heads in order within each.
        handle = qkv_layer.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self.vit.forward_features(x)
        finally:
            handle.remove()
        dim = qkv_layer.out_features // 3
        return captured[0][..., dim : 2 * dim].float()

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Structure distance of each input and its translation.

        Args:
            inputs: (N, 3, H, W) in [-1, 1].
            outputs: (N, 3, H', W') in [-1, 1]; resized to the inputs' resized size, so any size with (about) the
                same aspect ratio works.

        Returns:
            (N,) distances (0 for identical images).

        Raises:
            BadInputError: the batches differ in length.
        """
        if len(inputs) != len(outputs):
            raise BadInputError(f"DINO structure got {len(inputs)} inputs but {len(outputs)} outputs.")
        size = self.resized_size(*inputs.shape[-2:])
        return structure_distance_from_keys(self.keys(inputs, size), self.keys(outputs, size))


# ------------------------------------------------------------------------------------------------------ loading


def _dino_missing(name: str, looked_for: str, reason: str, hint: str) -> str:
    """The message for DINO weights that could not be loaded, with how to provide them."""
    return (
        f"Could not load the DINO weights {name!r} the structure distance is measured with ({reason}). They were"
        f" looked for {looked_for}. To provide them: {hint}, or pass path= a local model.safetensors /"
        f" pytorch_model.bin or a folder holding one; with HF_HUB_OFFLINE=1 nothing is downloaded, unset it to let it"
        f" be fetched."
    )


def _weights_file(name: str, path: str | os.PathLike | None, offline: bool) -> str:
    """A local file holding the weights: ``path`` (a file or a folder with one), else the Hugging Face cache/hub."""
    from ..hub import download_first, download_hint

    if path is not None:
        path = Path(path)
        if path.is_dir():
            found = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
            if found is None:
                raise BadInputError(f"Folder '{path}' holds no {' or '.join(_WEIGHT_FILES)} for the DINO network.")
            return str(found)
        if not path.is_file():
            raise BadInputError(f"DINO weights {str(path)!r} do not exist.")
        return str(path)
    repo_id = f"timm/{name}"
    found, looked_for, reason = download_first(repo_id, _WEIGHT_FILES, offline)
    if found is None:
        raise TurboI2IError(_dino_missing(name, looked_for, reason, download_hint(repo_id)))
    return found


def load_dino(
    name: str = DINO_MODEL,
    path: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A pretrained timm ViT for the structure distance (DINO ViT-B/8 by default), frozen, any image size.

    Args:
        name: a timm model name with a pretrained tag; its weights come from the hub repo ``timm/<name>``.
        path: a local weights file (``model.safetensors`` / ``pytorch_model.bin`` / the original ``.pth``) or a
            folder holding one, instead of the Hugging Face cache.
        local_files_only: never download (defaults to the ``HF_HUB_OFFLINE`` setting).
        device: where to put the network (CPU when None).

    Returns:
        a ``timm`` ``VisionTransformer`` built with ``dynamic_img_size=True``, in eval mode without gradients; wrap
        it in ``DINOStructureDistance``.

    Raises:
        BadInputError: unknown model name, a ``path`` that does not exist, or weights that cannot be read.
        TurboI2IError: the weights are neither on disk nor downloadable (one paragraph saying how to provide them).
    """
    import timm
    from safetensors import SafetensorError

    from ..errors import load_failure
    from ..hub import hub_offline
    from ..training.pretrained import freeze

    if not timm.is_model(name):
        raise BadInputError(f"Unknown timm model {name!r}; the DINO structure distance uses {DINO_MODEL!r}.")
    offline = hub_offline() if local_files_only is None else local_files_only
    file = _weights_file(name, path, offline)
    try:
        vit = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": file}, dynamic_img_size=True)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as error:  # damaged or hostile: exit 2
        raise BadInputError(
            _dino_missing(
                name,
                f"in the file {file}",
                f"unreadable: {load_failure(error)}",
                f"check that it holds {name!r} weights",
            )
        ) from error
    vit = freeze(vit)
    return vit.to(device) if device is not None else vit


def tiny_dino(seed: int = 0) -> nn.Module:
    """A tiny random timm ViT shaped like DINO's (patch 8, CLS token, any image size): width 32, 2 blocks, 2 heads.

    Args:
        seed: weights come from this seed; the caller's RNG is left untouched.

    Returns:
        a frozen ``VisionTransformer`` to wrap in ``DINOStructureDistance``.
    """
    from timm.models.vision_transformer import VisionTransformer

    from ..training.pretrained import freeze

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(
            img_size=DINO_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True
        )
    return freeze(vit)
