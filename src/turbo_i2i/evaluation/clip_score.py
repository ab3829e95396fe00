"""CLIP score: how well outputs match their captions, as the mean cosine similarity of CLIP image and text embeddings.

It is ``1 - L_CLIP-sim``, the paired objective's text-alignment loss (``training.losses.CLIPSimLoss``), so the number
evaluated here is the one the trainer optimises, computed by the same code (same preprocessing, same CLIP, same
caption cache). Range [-1, 1], higher is better; OpenAI's ViT-B/32 by default (``training.pretrained.load_clip``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import BadInputError
from ..training.losses import CLIPSimLoss


@torch.no_grad()
def clip_similarities(images: torch.Tensor, captions: str | Sequence[str], clip: CLIPSimLoss) -> torch.Tensor:
    """CLIP image-text cosine similarity of each image with its caption (per image, where ``CLIPSimLoss`` gives the
    batch mean of ``1 -`` these).

    Args:
        images: (N, 3, H, W) in [-1, 1].
        captions: one caption per image, or one for all.
        clip: a ``CLIPSimLoss`` built from ``load_clip()`` (``tiny_clip()`` in tests); it runs where its weights are.

    Returns:
        (N,) float32 similarities in [-1, 1], on the CLIP model's device.

    Raises:
        BadInputError: the number of captions differs from the number of images.
    """
    return clip.similarities(images.to(next(clip.parameters()).device), captions)


def clip_score(
    images: torch.Tensor | Sequence[torch.Tensor],
    captions: str | Sequence[str],
    clip: CLIPSimLoss,
    batch_size: int = 32,
) -> float:
    """Mean CLIP image-text similarity of images and their captions.

    Args:
        images: a (N, 3, H, W) tensor (scored ``batch_size`` at a time) or a list of (3, H, W) tensors of any sizes
            (scored one by one), in [-1, 1].
        captions: one caption per image, or one for all.
        clip: a ``CLIPSimLoss`` (``CLIPSimLoss(*load_clip())``).
        batch_size: images per forward pass for a tensor batch.

    Returns:
        the mean similarity in [-1, 1] (higher: outputs closer to their captions).

    Raises:
        BadInputError: no images, or a caption count that does not match.
    """
    if len(images) == 0:
        raise BadInputError("CLIP score got no images.")
    captions = [captions] * len(images) if isinstance(captions, str) else list(captions)
    if len(captions) != len(images):
        raise BadInputError(f"CLIP score got {len(images)} images but {len(captions)} captions.")
    step = batch_size if isinstance(images, torch.Tensor) else 1
    sims = [
        clip_similarities(torch.stack(list(images[i : i + step])), captions[i : i + step], clip)
        for i in range(0, len(images), step)
    ]
    return float(torch.cat(sims).mean())
