"""Tiled translation: exact blending, tiles never larger than asked, and the Translator's option."""

import numpy as np
import pytest
import torch
from PIL import Image

from turbo_i2i.errors import BadInputError
from turbo_i2i.pipeline import Translator
from turbo_i2i.tiling import tile_starts, translate_tiled


@pytest.mark.parametrize(
    "length,tile,overlap",
    [(100, 100, 16), (200, 64, 16), (1000, 256, 64), (136, 128, 64), (1000, 128, 64), (2040, 512, 64), (4096, 128, 8)],
)
def test_tiles_cover_the_image_with_the_overlap_on_the_latent_grid(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    # on the VAE's grid (all but a last start that cannot be): was 244 for (1000, 256, 64)
    assert all(s % 8 == 0 for s in starts[:-1]) and (starts[-1] % 8 == 0 or (length - tile) % 8)


def test_a_noise_map_is_shared_by_the_tiles_where_they_overlap():
    x = torch.rand(1, 3, 200, 328, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 25, 41, generator=torch.Generator().manual_seed(1))
    up = torch.nn.functional.interpolate

    def translate(t, noise):  # the output is the noise it was given, at pixel size: blending must give the map back
        assert noise.shape[-2:] == (t.shape[-2] // 8, t.shape[-1] // 8)
        return up(noise, scale_factor=8.0, mode="nearest")

    torch.testing.assert_close(
        translate_tiled(translate, x, 128, 64, latents={"noise": noise}), up(noise, scale_factor=8.0)
    )


def test_a_pointwise_translation_is_reproduced_exactly_and_tiles_stay_small():
    x = torch.rand(2, 3, 200, 328, generator=torch.Generator().manual_seed(0))
    seen = []

    def translate(t):
        seen.append(tuple(t.shape[-2:]))
        return torch.cat([t * 2 - 1, t.mean(1, keepdim=True)], 1)  # per pixel: blending must give it back

    out = translate_tiled(translate, x, tile=128, overlap=32)
    torch.testing.assert_close(out, translate(x), rtol=0, atol=1e-6)
    assert max(h for h, _ in seen[:-1]) <= 128 and max(w for _, w in seen[:-1]) <= 128 and len(seen) > 4


def test_an_image_within_one_tile_is_translated_whole():
    x = torch.rand(1, 3, 64, 96)
    assert torch.equal(translate_tiled(lambda t: t * 3, x, tile=128, overlap=64), x * 3)


def test_translator_tiles_large_images_and_checks_the_tile_size(tiny_model_dir):
    translator = Translator.from_pretrained(tiny_model_dir)
    calls = []
    translator.generator.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape[-2:])))
    image = Image.fromarray(np.uint8(np.random.default_rng(0).integers(0, 256, (200, 264, 3))))
    tiled = translator(image, tile_size=128)
    assert tiled.size == (264, 200) and max(max(c) for c in calls) == 128
    assert len(calls) == len(tile_starts(200, 128, 64)) * len(tile_starts(264, 128, 64)) == 12
    calls.clear()
    whole = translator(image)
    assert calls == [(200, 264)]
    diff = np.abs(np.asarray(tiled, dtype=int) - np.asarray(whole, dtype=int))
    assert diff.mean() < 40  # the same model on the same picture: tiles change details, not the whole image
    with pytest.raises(BadInputError, match="tile_size"):
        translator(image, tile_size=100)


@torch.no_grad()
def test_a_stochastic_models_tiles_start_from_one_noise_map(tmp_path):
    from conftest import make_generator

    from turbo_i2i.checkpoints import save_pretrained

    generator, _ = make_generator(stochastic=True, trained_seed=3, prompts={"a2b": "a sketch"}, default_r=0.4)
    translator = Translator.from_pretrained(save_pretrained(generator, tmp_path / "model"))
    calls = []
    hook = translator.generator.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["noise"].clone()), with_kwargs=True
    )
    image = Image.fromarray(np.uint8(np.random.default_rng(0).integers(0, 256, (136, 264, 3))))
    first = translator(image, tile_size=128, seed=5)
    hook.remove()
    rows, cols = tile_starts(136, 128, 64), tile_starts(264, 128, 64)
    assert len(calls) == len(rows) * len(cols) == 8
    # each tile's noise is its part of one map: rebuilt from the tiles, every latent pixel agrees between them
    whole = torch.full((1, calls[0].shape[1], 17, 33), float("nan"))
    for k, (top, left) in enumerate((t, le) for t in rows for le in cols):
        part = whole[..., top // 8 : top // 8 + 16, left // 8 : left // 8 + 16]
        seen = ~part.isnan()
        assert torch.equal(part[seen], calls[k][seen]), k
        part.copy_(calls[k])
    assert not whole.isnan().any()
    assert np.array_equal(np.asarray(translator(image, tile_size=128, seed=5)), np.asarray(first))  # seeded
    # sampling the posterior too: both draws are made once for the whole image, in the generator's order
    # (posterior, then noise), and each tile takes its parts (each tile drew its own posterior sample)
    draws = []
    hook = translator.generator.register_forward_pre_hook(
        lambda module, args, kwargs: draws.append((kwargs["posterior_noise"], kwargs["noise"])), with_kwargs=True
    )
    translator(image, tile_size=128, seed=5, sample_posterior=True)
    hook.remove()
    rng = torch.Generator().manual_seed(5)
    posterior, noise = (torch.randn(1, 4, 17, 33, generator=rng) for _ in range(2))
    for (top, left), (tile_posterior, tile_noise) in zip(((t, le) for t in rows for le in cols), draws, strict=True):
        where = (..., slice(top // 8, top // 8 + 16), slice(left // 8, left // 8 + 16))
        assert torch.equal(tile_posterior, posterior[where]) and torch.equal(tile_noise, noise[where])
    # an image within one tile draws as an untiled call does (the posterior sample first): the same picture
    small = image.crop((0, 0, 96, 64))
    for posterior in (False, True):
        untiled = translator(small, seed=3, sample_posterior=posterior)
        assert np.array_equal(np.asarray(translator(small, tile_size=128, seed=3, sample_posterior=posterior)),
                              np.asarray(untiled)), posterior  # fmt: skip


def test_cli_tile_option(tiny_model_dir, tmp_path, capsys):
    from turbo_i2i.cli import main

    Image.fromarray(np.uint8(np.random.default_rng(1).integers(0, 256, (150, 200, 3)))).save(tmp_path / "in.png")
    args = ["translate", "--model", str(tiny_model_dir), "--input", str(tmp_path / "in.png")]
    assert main([*args, "--output", str(tmp_path / "out.png"), "--tile", "128"]) == 0
    assert Image.open(tmp_path / "out.png").size == (200, 150)
    assert main([*args, "--output", str(tmp_path / "bad.png"), "--tile", "60"]) == 2
    assert "--tile must be a multiple of 8" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()
