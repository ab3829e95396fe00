"""Tiled translation: large images in overlapping tiles, so peak memory depends on the tile size, not the image size.

Every tile goes through the whole one-step generator (encoder, UNet, decoder with its skips) and the tiles are
blended with linear ramps over their overlap. The UNet's attention and the VAE's group norms then see one tile at a
time, so the result differs from the untiled one (as with diffusers' VAE tiling); it is therefore opt-in
(``Translator(..., tile_size=...)``, ``turbo-i2i translate --tile``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def tile_starts(length: int, tile: int, overlap: int, align: int = 8) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` pixels with at least ``overlap`` shared.

    The starts are multiples of ``align`` (all but the last where ``length - tile`` is not): with the VAE's factor 8,
    every tile's latents then lie on the whole image's latent grid, so neighbours encode their shared pixels alike and
    a stochastic model's tiles can take their part of one noise map.

    Args:
        length: the image side.
        tile: the tile side (at most ``length``).
        overlap: pixels shared by neighbouring tiles (less than ``tile``).
        align: what the starts are multiples of.

    Returns:
        offsets, first 0 and last ``length - tile``, evenly spread.
    """
    if length <= tile:
        return [0]
    span = tile - overlap - align  # rounding a start moves it by up to align / 2: spaced so no overlap shrinks
    if span <= 0:
        span, align = tile - overlap, 1
    count = 1 + -(-(length - tile) // span)  # ceil: enough tiles that neighbours share >= overlap
    step = (length - tile) / (count - 1)
    return [min(length - tile, align * round(i * step / align)) for i in range(count - 1)] + [length - tile]


def _ramp(tile: int, overlap: int, first: bool, last: bool, device, dtype) -> torch.Tensor:
    """1-D blending weights of one tile: rising over the overlap at its start, falling at its end (not at borders)."""
    weights = torch.ones(tile, device=device, dtype=dtype)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, device=device, dtype=dtype) / (overlap + 1)
        if not first:
            weights[:overlap] = ramp
        if not last:
            weights[-overlap:] = ramp.flip(0)
    return weights


def translate_tiled(
    translate: Callable[..., torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int = 64,
    latents: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply ``translate`` to overlapping tiles of ``x`` and blend the results into one image.

    Args:
        translate: images (N, 3, h, w) -> images (N, C, h, w), e.g. one generator call; with ``latents``, called as
            ``translate(tile, **the tile's part of each)``.
        x: the images (N, 3, H, W); H and W multiples of 8.
        tile: tile side in pixels (a multiple of 8).
        overlap: pixels shared by neighbouring tiles (a multiple of 8, less than ``tile``).
        latents: maps of the whole image on the latent grid (N, C, H / 8, W / 8) by ``translate``'s keyword (the
            noise map of a stochastic model, the posterior's draw), so neighbouring tiles start from the same draws
            where they overlap (a draw per tile would blend two different pictures).

    Returns:
        (N, C, H, W): ``translate(x)`` itself when the image fits one tile, else the blend of the tiles.
    """
    latents = latents or {}
    if tile % 8 or overlap % 8 or not 0 <= overlap < tile:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of 8 with overlap < tile.")
    height, width = x.shape[-2:]
    if height % 8 or width % 8:
        raise ValueError(f"image sides must be multiples of 8, got {height}x{width}.")
    if height <= tile and width <= tile:
        return translate(x, **latents)
    th, tw = min(tile, height), min(tile, width)
    out = weight_sum = None
    rows, cols = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            part = x[..., top : top + th, left : left + tw]
            # starts are multiples of 8 (tile_starts): the tile's latents are these of the whole maps
            own = {k: v[..., top // 8 : (top + th) // 8, left // 8 : (left + tw) // 8] for k, v in latents.items()}
            y = translate(part, **own).float()
            wy = _ramp(th, overlap, i == 0, i == len(rows) - 1, y.device, y.dtype)
            wx = _ramp(tw, overlap, j == 0, j == len(cols) - 1, y.device, y.dtype)
            w = wy[:, None] * wx[None, :]
            if out is None:
                out = torch.zeros(*y.shape[:2], height, width, device=y.device)
                weight_sum = torch.zeros(height, width, device=y.device)
            out[..., top : top + th, left : left + tw] += y * w
            weight_sum[top : top + th, left : left + tw] += w
    return out / weight_sum
