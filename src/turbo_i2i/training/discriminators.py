"""Discriminators and the adversarial loss L_GAN of pix2pix-Turbo / CycleGAN-Turbo.

The paper (Parmar et al. 2024) trains with a "vision-aided" discriminator (Kumari et al. 2022): a frozen CLIP ViT
whose features feed small trainable heads, with DiffAugment (Zhao et al. 2020) in front and the
``multilevel_sigmoid_s`` loss (binary cross-entropy on every head's logits, real labels smoothed to 0.8). It is built
here on open_clip. ``PatchGANDiscriminator`` is the classic pix2pix discriminator, which needs no pretrained weights.

Every discriminator maps images in [-1, 1] to a list of logit tensors, one per level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..errors import BadInputError
from .pretrained import clip_image_input, freeze, load_clip

DISCRIMINATOR_KINDS = ("clip", "patchgan")


class PatchGANDiscriminator(nn.Module):
    """The pix2pix "NLayer" PatchGAN discriminator (Isola et al. 2017): strided 4x4 convs, each logit judges one patch.

    Args:
        in_channels: image channels.
        ndf: channels of the first conv (doubled per layer, at most 8x).
        n_layers: number of stride-2 convs after the first.
        norm_layer: normalisation after each inner conv (batch norm, as in pix2pix).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm_layer=nn.BatchNorm2d):
        super().__init__()
        # A conv followed by a norm with its own shift needs no bias (pix2pix drops it for batch norm).
        bias = norm_layer is not nn.BatchNorm2d
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last inner conv keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), norm_layer(ndf * mult)]
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch logits.

        Args:
            images: (N, C, H, W) in [-1, 1].

        Returns:
            ``[logits]`` with logits of shape (N, 1, h, w) (30x30 for 256 px and the defaults).
        """
        return [self.model(images)]


def _uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Draw where the generator lives (the global RNG: where the images are), then move to the images.
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _randint(low: int, high: int, n: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randint(low, high, (n,), generator=generator, device=device).to(like.device)


class DiffAugment(nn.Module):
    """Differentiable augmentation (Zhao et al. 2020) applied to every image a discriminator sees, real or fake, so
    it cannot memorise the few training images while the generator still gets gradients through it.

    Policies: "color" (brightness +U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5)), "translation"
    (shift by up to 1/8 of the size, zero fill) and "cutout" (zero a square of half the size). Each image draws its
    own parameters.

    Args:
        policy: comma-separated policies, applied in this order.
        generator: source of all randomness (the global RNG when None), so runs can be seeded.
    """

    POLICIES = ("color", "translation", "cutout")

    def __init__(self, policy: str = "color,translation,cutout", generator: torch.Generator | None = None):
        super().__init__()
        self.policy = [p for p in policy.split(",") if p]
        unknown = [p for p in self.policy if p not in self.POLICIES]
        if unknown:
            raise BadInputError(f"Unknown DiffAugment policy {unknown}; choose from {', '.join(self.POLICIES)}.")
        self.generator = generator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: (N, C, H, W), typically in [-1, 1].

        Returns:
            augmented images of the same shape, differentiable w.r.t. ``images``.
        """
        x = images
        for policy in self.policy:
            x = getattr(self, f"_{policy}")(x)
        return x

    def _color(self, x: torch.Tensor) -> torch.Tensor:
        n, g = x.shape[0], self.generator
        x = x + (_uniform((n, 1, 1, 1), x, g) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_uniform((n, 1, 1, 1), x, g) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (_uniform((n, 1, 1, 1), x, g) + 0.5) + mean

    def _translation(self, x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
        n, _, h, w = x.shape
        sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
        dy = _randint(-sh, sh + 1, n, x, self.generator)
        dx = _randint(-sw, sw + 1, n, x, self.generator)
        # Gather from a 1-pixel zero border: source indices that fall outside land on it.
        rows = (torch.arange(h, device=x.device)[None] + dy[:, None] + 1).clamp(0, h + 1)  # (N, H)
        cols = (torch.arange(w, device=x.device)[None] + dx[:, None] + 1).clamp(0, w + 1)  # (N, W)
        padded = F.pad(x, [1, 1, 1, 1])
        batch = torch.arange(n, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def _cutout(self, x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
        n, _, h, w = x.shape
        ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
        # The square's centre may sit anywhere in the image, so the square can be partly outside it.
        top = _randint(0, h + (1 - ch % 2), n, x, self.generator) - ch // 2
        left = _randint(0, w + (1 - cw % 2), n, x, self.generator) - cw // 2
        rows = torch.arange(h, device=x.device)[None]
        cols = torch.arange(w, device=x.device)[None]
        inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + ch)  # (N, H)
        inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + cw)  # (N, W)
        keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
        return x * keep[:, None].to(x.dtype)


class _TokenHead(nn.Module):
    """Logit map from a (N, width, gh, gw) grid of ViT patch tokens."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(width, channels, 3, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(channels, 1, 1)),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


class _EmbeddingHead(nn.Module):
    """One logit per image from the final CLIP image embedding."""

    def __init__(self, embed_dim: int, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Linear(embed_dim, channels)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(channels, 1)),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


def _default_layers(depth: int) -> tuple[int, ...]:
    # vision-aided-loss reads ViT-B/32 (12 blocks) after blocks 4 and 8: a third and two thirds of the way.
    return tuple(sorted({max(1, round(depth * k / 3)) for k in (1, 2)}))


class VisionAidedDiscriminator(nn.Module):
    """The vision-aided discriminator: a frozen CLIP ViT image tower with small trainable heads on its features.

    Images go through DiffAugment, are mapped to CLIP's input (resize, mean/std) and run once through the tower's
    blocks (open_clip's ``forward_intermediates``); the patch tokens after each depth in ``layers`` feed a conv head
    (a logit map) and the final image embedding feeds an MLP head (one logit). Only the heads train; the tower stays
    frozen and in eval mode but passes gradients to the images, so the generator learns through it.

    Args:
        clip_model: an open_clip model with a ViT image tower (or the tower itself), e.g. from ``load_clip()``.
        layers: number of blocks run before each read-out (1-based depths); None: a third and two thirds of the
            depth, i.e. (4, 8) for ViT-B/32 as in vision-aided-loss.
        head_channels: hidden width of the heads.
        augment: apply DiffAugment before the tower.
        generator: random source of the augmentation (global RNG when None).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        layers: Sequence[int] | None = None,
        head_channels: int = 256,
        augment: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        visual = getattr(clip_model, "visual", clip_model)
        if not (hasattr(visual, "forward_intermediates") and hasattr(visual, "grid_size")):
            raise BadInputError(
                f"The vision-aided discriminator needs an open_clip ViT image tower (VisionTransformer with"
                f" forward_intermediates), not {type(visual).__name__}; use a ViT model such as 'ViT-B-32'."
            )
        self.visual = freeze(visual)
        depth = len(visual.transformer.resblocks)
        self.layers = tuple(layers) if layers is not None else _default_layers(depth)
        if not self.layers or any(not 1 <= d <= depth for d in self.layers):
            raise BadInputError(f"Discriminator layers {self.layers} must be depths from 1 to {depth}.")
        width = visual.transformer.width
        embed_dim = visual.proj.shape[1] if visual.proj is not None else width
        self.augment = DiffAugment(generator=generator) if augment else nn.Identity()
        self.heads = nn.ModuleList([_TokenHead(width, head_channels) for _ in self.layers])
        self.heads.append(_EmbeddingHead(embed_dim, head_channels))

    def train(self, mode: bool = True) -> VisionAidedDiscriminator:
        """Switch the heads' mode; the frozen tower stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen tower's features the heads see (after DiffAugment).

        Args:
            images: (N, 3, H, W) in [-1, 1], any size (resized to the tower's).

        Returns:
            one (N, width, gh, gw) patch-token grid per entry of ``layers`` (gh x gw: the patch grid, 7x7 for
            ViT-B/32), then the (N, embed_dim) image embedding; float32.
        """
        x = clip_image_input(self.augment(images), self.visual)
        # indices are 0-based block indices: the output of block d - 1 is the stream after d blocks.
        out = self.visual.forward_intermediates(x, indices=[d - 1 for d in self.layers], output_fmt="NCHW")
        return [feature.float() for feature in (*out["image_intermediates"], out["image_features"])]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every level.

        Args:
            images: (N, 3, H, W) in [-1, 1], any size (resized to the tower's).

        Returns:
            one (N, 1, gh, gw) logit map per entry of ``layers``, then the (N, 1) logits of the image embedding.
        """
        return [head(feature) for head, feature in zip(self.heads, self.features(images))]


def multilevel_sigmoid_s(logits_list: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """Binary cross-entropy with logits against a constant label, averaged over levels.

    vision-aided-loss's "multilevel_sigmoid_s" uses label 0.8 for real images (one-sided label smoothing) and 0 for
    fakes. Each level is averaged over its elements first, so a 7x7 map and a single logit weigh the same.

    Args:
        logits_list: one logit tensor per level.
        target: the label, e.g. 0.8 (real), 0 (fake) or 1 (the generator's goal).

    Returns:
        a scalar.
    """
    losses = [F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target)) for logits in logits_list]
    return torch.stack(losses).mean()


def discriminator_loss(
    disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, real_target: float = 0.8
) -> torch.Tensor:
    """The discriminator's loss: real images towards ``real_target``, generated ones towards 0.

    The generated images are detached, so this loss trains the discriminator only and never the generator.

    Args:
        disc: a discriminator returning a list of logits.
        real: real images (N, 3, H, W) in [-1, 1].
        fake: generated images in [-1, 1].
        real_target: the smoothed label of real images (0.8 in pix2pix-Turbo).

    Returns:
        a scalar: the real term plus the fake term.
    """
    return multilevel_sigmoid_s(disc(real.detach()), real_target) + multilevel_sigmoid_s(disc(fake.detach()), 0.0)


def generator_gan_loss(disc: nn.Module, fake: torch.Tensor, target: float = 1.0) -> torch.Tensor:
    """L_GAN for the generator: push the discriminator's verdict on generated images towards "real".

    Args:
        disc: a discriminator returning a list of logits (its parameters get gradients too; step only the generator).
        fake: generated images in [-1, 1], not detached.
        target: the label the generator aims for.

    Returns:
        a scalar, differentiable w.r.t. ``fake``.
    """
    return multilevel_sigmoid_s(disc(fake), target)


def build_discriminator(kind: str = "clip", clip: nn.Module | None = None, **kwargs) -> nn.Module:
    """Build a discriminator by name.

    Args:
        kind: "clip" (the paper's vision-aided discriminator) or "patchgan" (no pretrained weights needed).
        clip: for "clip", the open_clip model to build on; None loads OpenAI's ViT-B/32 with ``load_clip()``.
        **kwargs: passed to the discriminator's constructor.

    Returns:
        the discriminator.

    Raises:
        BadInputError: unknown ``kind``.
        TurboI2IError: "clip" without ``clip`` and the CLIP weights cannot be loaded.
    """
    if kind == "clip":
        return VisionAidedDiscriminator(clip if clip is not None else load_clip()[0], **kwargs)
    if kind == "patchgan":
        return PatchGANDiscriminator(**kwargs)
    raise BadInputError(f"Unknown discriminator kind {kind!r}; choose one of {', '.join(DISCRIMINATOR_KINDS)}.")
