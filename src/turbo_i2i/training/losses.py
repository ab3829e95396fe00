"""Reconstruction and text-alignment losses of pix2pix-Turbo's paired objective (Parmar et al. 2024, Sec. 4.1).

The paired objective of the paper, and the names used here:

    L = lambda_l2 * L_2 + lambda_lpips * L_LPIPS + lambda_gan * L_GAN + lambda_clipsim * L_CLIP-sim
      = 1 * loss_l2 + 5 * LPIPSLoss + 0.5 * generator_gan_loss + 5 * CLIPSimLoss   (PairedTrainConfig.lambda_*)

- ``loss_l2``: L_2, the pixel-wise mean squared error to the target image.
- ``LPIPSLoss``: L_LPIPS, the learned perceptual distance to the target (VGG16 trunk).
- ``CLIPSimLoss``: L_CLIP-sim, 1 - cosine similarity of the CLIP embeddings of the output image and its caption,
  which keeps the output faithful to the text.
- ``generator_gan_loss`` (in ``discriminators``): L_GAN, the adversarial loss of the vision-aided CLIP discriminator.

All images are in [-1, 1], as the generator outputs them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInputError
from .pretrained import clip_image_input, freeze


def loss_l2(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_2: mean squared error between the output and target images.

    Args:
        output: generated images (N, 3, H, W).
        target: ground-truth images of the same shape.

    Returns:
        a scalar.
    """
    return F.mse_loss(output, target)


class LPIPSLoss(nn.Module):
    """L_LPIPS: the mean LPIPS distance between output and target images in [-1, 1].

    Args:
        lpips_net: a frozen LPIPS network, ``(x, y) -> (N, 1, 1, 1)`` (``load_lpips()`` or ``tiny_lpips()``).
    """

    def __init__(self, lpips_net: nn.Module):
        super().__init__()
        self.net = freeze(lpips_net)

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Switch the loss module's mode; the frozen LPIPS net stays in eval mode (its heads have dropout)."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance.

        Args:
            output: generated images (N, 3, H, W) in [-1, 1].
            target: ground-truth images of the same shape.

        Returns:
            a scalar (fp32), differentiable w.r.t. ``output``.
        """
        # In fp32 whatever autocast the trainer runs: LPIPS divides each feature map by its root sum of squares, which
        # overflows fp16's range (65504) for large activations (on the CPU autocast keeps sums in fp16: the tiny
        # stand-in network gave NaN), so fp16 training would silently lose the term.
        with torch.autocast(output.device.type, enabled=False):
            return self.net(output.float(), target.float()).mean()


class CLIPSimLoss(nn.Module):
    """L_CLIP-sim: mean of ``1 - cos(CLIP image embedding of the output, CLIP text embedding of its caption)``.

    Outputs in [-1, 1] are mapped to [0, 1], resized to the CLIP image size (bicubic, antialiased) and normalised
    with CLIP's mean/std. The text tower is frozen and captions repeat across epochs, so caption embeddings are
    computed once and cached (least recently used ones dropped beyond ``cache_size``).

    Args:
        clip_model: a frozen open_clip model (``load_clip()`` or ``tiny_clip()``).
        tokenizer: its tokenizer: list of captions -> (N, context) token ids.
        cache_size: how many caption embeddings to keep.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, cache_size: int = 10_000):
        super().__init__()
        self.clip = freeze(clip_model)
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def train(self, mode: bool = True) -> CLIPSimLoss:
        """Switch the loss module's mode; the frozen CLIP model stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def caption_embeddings(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """Unit-norm CLIP text embeddings, encoding only captions not seen before.

        Args:
            captions: one caption per image.
            device: where the result should live.

        Returns:
            (N, embed_dim) float32.
        """
        # One caption per call: in a batch, the text tower's matrix products round differently with the batch size
        # (1 float32 ulp), so a caption's embedding would depend on which others happened to be missing with it, and
        # a resumed run (empty cache) would drift from the uninterrupted one. Each caption is encoded once per run.
        for caption in dict.fromkeys(c for c in captions if c not in self._cache):
            tokens = self.tokenizer([caption]).to(device)
            self._cache[caption] = self.clip.encode_text(tokens, normalize=True).float()[0]
        for caption in captions:
            self._cache.move_to_end(caption)
        embeddings = torch.stack([self._cache[c].to(device) for c in captions])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeddings

    def similarities(self, images: torch.Tensor, captions: str | Sequence[str]) -> torch.Tensor:
        """CLIP image-text cosine similarity of each image with its caption (also the CLIP score's).

        Args:
            images: (N, 3, H, W) in [-1, 1], on the CLIP model's device.
            captions: one caption per image, or one caption for all.

        Returns:
            (N,) float32 in [-1, 1], differentiable w.r.t. ``images``.

        Raises:
            BadInputError: the number of captions differs from the number of images.
        """
        captions = [captions] * len(images) if isinstance(captions, str) else list(captions)
        if len(captions) != len(images):
            raise BadInputError(f"CLIP similarity got {len(images)} images but {len(captions)} captions.")
        text = self.caption_embeddings(captions, images.device)
        image = self.clip.encode_image(clip_image_input(images, self.clip.visual), normalize=True).float()
        return (image * text).sum(dim=-1)

    def forward(self, output: torch.Tensor, captions: str | Sequence[str]) -> torch.Tensor:
        """Mean CLIP dissimilarity of images and captions.

        Args:
            output: generated images (N, 3, H, W) in [-1, 1].
            captions: one caption per image, or one caption for all.

        Returns:
            a scalar in [0, 2], differentiable w.r.t. ``output``.
        """
        return (1.0 - self.similarities(output, captions)).mean()
