"""Discriminators, DiffAugment and the adversarial losses, on tiny random stand-ins only (never a download)."""

import math
import socket

import pytest
import torch
from torch import nn

from turbo_i2i.errors import BadInputError, TurboI2IError
from turbo_i2i.training.discriminators import (
    DiffAugment,
    PatchGANDiscriminator,
    VisionAidedDiscriminator,
    build_discriminator,
    discriminator_loss,
    generator_gan_loss,
    multilevel_sigmoid_s,
)
from turbo_i2i.training.pretrained import clip_image_input, tiny_clip


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip()[0]


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def real_and_fake(n=4, size=32):
    """Smooth gradients as "real", noise as "fake": separable, so a discriminator can learn them."""
    ramp = torch.linspace(-1, 1, size)
    real = (ramp[None, None, :, None] * ramp[None, None, None, :]).expand(n, 3, size, size).clone()
    return real, images(n, size, seed=3)


@pytest.mark.parametrize(("size", "n_layers", "expected"), [(256, 3, 30), (64, 3, 6), (64, 2, 14)])
def test_patchgan_output_shapes(size, n_layers, expected):
    disc = PatchGANDiscriminator(ndf=8, n_layers=n_layers)
    logits = disc(images(n=2, size=size))
    assert isinstance(logits, list) and len(logits) == 1
    assert logits[0].shape == (2, 1, expected, expected)


def test_patchgan_default_width_is_pix2pix():
    convs = [m for m in PatchGANDiscriminator().modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]


def test_diffaugment_is_reproducible_from_its_generator():
    x = images(n=4)
    a = DiffAugment(generator=seeded(0))(x)
    b = DiffAugment(generator=seeded(0))(x)
    c = DiffAugment(generator=seeded(1))(x)
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_diffaugment_keeps_shape_and_is_differentiable(policy):
    x = images(n=3, size=24).requires_grad_()
    out = DiffAugment(policy, generator=seeded(0))(x)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaugment_translation_shifts_by_at_most_an_eighth():
    x = images(n=6, size=32)
    out = DiffAugment("translation", generator=seeded(0))(x)
    shifts = []
    for src, dst in zip(x, out):
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                shifted = torch.zeros_like(src)
                ys, xs = slice(max(0, -dy), 32 - max(0, dy)), slice(max(0, -dx), 32 - max(0, dx))
                ys_src, xs_src = slice(max(0, dy), 32 - max(0, -dy)), slice(max(0, dx), 32 - max(0, -dx))
                shifted[:, ys, xs] = src[:, ys_src, xs_src]
                if torch.equal(shifted, dst):
                    shifts.append((dy, dx))
    assert len(shifts) == len(x)  # every output is its input shifted by |dy|, |dx| <= 32 / 8, zero-filled
    assert any(shift != (0, 0) for shift in shifts)


def test_diffaugment_cutout_zeroes_at_most_a_quarter():
    out = DiffAugment("cutout", generator=seeded(0))(torch.ones(8, 3, 32, 32))
    zero_fraction = (out[:, 0] == 0).float().mean(dim=(1, 2))
    # A 16x16 square whose centre lies in the image: from a 1/16 corner of it up to all of it.
    assert ((zero_fraction >= 1 / 16) & (zero_fraction <= 1 / 4)).all()


def test_diffaugment_rejects_unknown_policy():
    with pytest.raises(BadInputError, match="cutout"):
        DiffAugment("color,flip")


def test_vision_aided_only_heads_train(clip_model):
    disc = VisionAidedDiscriminator(clip_model, layers=(1, 2), head_channels=16)
    trainable = {name for name, p in disc.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("heads.") for name in trainable)
    assert not any(p.requires_grad for p in disc.visual.parameters())
    disc.train()
    assert disc.heads.training and not disc.visual.training


def test_vision_aided_returns_logits_per_level(clip_model):
    disc = VisionAidedDiscriminator(clip_model, layers=(1, 2), head_channels=16)
    logits = disc(images(n=3, size=48))  # any size: resized to the tower's 64 px
    # Two token grids (64 px / patch 8 = 8x8) and the final embedding.
    assert [tuple(x.shape) for x in logits] == [(3, 1, 8, 8), (3, 1, 8, 8), (3, 1)]


def test_vision_aided_reads_the_stream_after_each_depth(clip_model):
    disc = VisionAidedDiscriminator(clip_model, layers=(2,), augment=False)
    x = images(n=2, size=64)
    tokens, embedding = disc.features(x)
    visual = clip_model.visual
    pixels = clip_image_input(x, visual)
    assert torch.allclose(embedding, visual(pixels), atol=1e-5)  # the final level is CLIP's image embedding
    # After both blocks the token grid is the stream CLIP's own output tokens come from (before ln_post).
    visual.output_tokens = True
    try:
        _, clip_tokens = visual(pixels)
    finally:
        visual.output_tokens = False
    grid = tokens.flatten(2).transpose(1, 2)  # (N, gh * gw, width)
    assert torch.allclose(visual.ln_post(grid), clip_tokens, atol=1e-5)
    shallow = VisionAidedDiscriminator(clip_model, layers=(1,), augment=False).features(x)[0]
    assert not torch.allclose(shallow, tokens)


def test_vision_aided_default_layers_and_validation(clip_model):
    assert VisionAidedDiscriminator(clip_model).layers == (1,)  # a 2-block tower; ViT-B/32's 12 give (4, 8)
    with pytest.raises(BadInputError, match="from 1 to 2"):
        VisionAidedDiscriminator(clip_model, layers=(3,))
    with pytest.raises(BadInputError, match="ViT"):
        VisionAidedDiscriminator(nn.Linear(2, 2))


def test_vision_aided_tower_unchanged_by_a_discriminator_step(clip_model):
    disc = VisionAidedDiscriminator(clip_model, layers=(1, 2), head_channels=16)
    tower = {k: v.clone() for k, v in disc.visual.state_dict().items()}
    heads = {k: v.clone() for k, v in disc.heads.state_dict().items()}
    optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-2, weight_decay=0.1)  # all parameters, on purpose
    real, fake = real_and_fake()
    discriminator_loss(disc, real, fake).backward()
    optimizer.step()
    assert all(torch.equal(v, tower[k]) for k, v in disc.visual.state_dict().items())
    assert any(not torch.equal(v, heads[k]) for k, v in disc.heads.state_dict().items())


def d_loss_before_and_after_training(disc, steps=15, lr=2e-3):
    real, fake = real_and_fake()
    optimizer = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.999))

    def evaluate():
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)  # the same augmentations for both measurements
            return discriminator_loss(disc, real, fake).item()

    before = evaluate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for _ in range(steps):
            optimizer.zero_grad()
            discriminator_loss(disc, real, fake).backward()
            optimizer.step()
    return before, evaluate()


def test_training_lowers_the_vision_aided_discriminator_loss(clip_model):
    torch.manual_seed(0)
    # Without DiffAugment: through a tiny random tower the augmented batches take hundreds of steps to separate.
    disc = VisionAidedDiscriminator(clip_model, head_channels=16, augment=False)
    before, after = d_loss_before_and_after_training(disc, steps=20, lr=1e-2)
    assert after < before - 0.3


def test_training_lowers_the_patchgan_discriminator_loss():
    torch.manual_seed(0)
    before, after = d_loss_before_and_after_training(PatchGANDiscriminator(ndf=8, n_layers=2).eval())
    assert after < before - 0.1


@pytest.mark.parametrize("kind", ["clip", "patchgan"])
def test_gan_gradients_reach_the_generator_only_through_the_generator_loss(kind, clip_model):
    disc = build_discriminator(kind, clip=clip_model) if kind == "clip" else build_discriminator(kind, ndf=8)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    fake = torch.tanh(generator(images(n=2, size=32, seed=5)))
    real = images(n=2, size=32, seed=6)

    discriminator_loss(disc, real, fake).backward()
    assert all(p.grad is None for p in generator.parameters())  # fake is detached in the D loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())

    generator_gan_loss(disc, fake).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())


def test_multilevel_sigmoid_s_averages_levels():
    zeros = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1)]
    assert math.isclose(multilevel_sigmoid_s(zeros, 0.8).item(), math.log(2), rel_tol=1e-6)
    confident = [torch.full((2, 1, 4, 4), 20.0), torch.zeros(2, 1)]  # BCE(20, 1) ~ 0, BCE(0, 1) = log 2
    assert math.isclose(multilevel_sigmoid_s(confident, 1.0).item(), math.log(2) / 2, rel_tol=1e-4)
    # Label smoothing: with target 0.8 the best logit is log(0.8 / 0.2), not +infinity.
    best = torch.full((1, 1), math.log(4.0), requires_grad=True)
    multilevel_sigmoid_s([best], 0.8).backward()
    assert abs(best.grad.item()) < 1e-6


def test_build_discriminator_kinds(clip_model):
    assert isinstance(build_discriminator("patchgan", ndf=8), PatchGANDiscriminator)
    assert isinstance(build_discriminator("clip", clip=clip_model), VisionAidedDiscriminator)
    with pytest.raises(BadInputError, match="clip, patchgan"):
        build_discriminator("stylegan")


def test_build_clip_discriminator_without_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(TurboI2IError, match=r"Could not load the CLIP weights 'ViT-B-32'.*path= a local") as error:
        build_discriminator("clip")
    assert "--" not in str(error.value)  # the library names no command's options; eval and train add their own
