"""Sub-pixel upsampling computes what diffusers' Upsample2D computes (nearest 2x, then the 3x3 conv), LoRA included."""

import copy

import pytest
import torch
from conftest import embed, make_generator
from diffusers.models.upsampling import Upsample2D
from peft.tuners.lora import LoraLayer
from torch.utils.flop_counter import FlopCounterMode

from turbo_i2i.subpixel import SubPixelUpsample, phase_kernels, restore_upsamplers, use_subpixel_upsampling


def upsampler(channels=6, out_channels=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    module = Upsample2D(channels, use_conv=True, out_channels=out_channels).to(dtype)
    with torch.no_grad():
        module.conv.bias.normal_()
    return module


@torch.no_grad()
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_equals_nearest_upsample_then_conv_in_float64(layout):
    plain = upsampler()
    fast = SubPixelUpsample(plain.conv)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=layout)
    out = fast(x)
    assert out.shape == (2, 5, 10, 14)
    assert out.is_contiguous(memory_format=layout)  # the layout flows on
    torch.testing.assert_close(out, plain(x), rtol=0, atol=1e-12)


def test_phase_kernels_sum_the_taps_each_output_phase_sees():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows (0 1 2), (3 4 5), (6 7 8)
    k = phase_kernels(w)
    # phase (0, 0): rows (w0, w1 + w2), columns (c0, c1 + c2)
    assert k[0, 0].flatten().tolist() == [0, 1 + 2, 3 + 6, 4 + 5 + 7 + 8]
    assert k[1, 1].flatten().tolist() == [0 + 1 + 3 + 4, 2 + 5, 6 + 7, 8]
    assert sum(kernel.sum() for kernel in k.values()) == 4 * w.sum()  # each tap is used once per phase


@torch.no_grad()
def test_runs_four_ninths_of_the_multiply_adds():
    plain = upsampler(channels=8, out_channels=8, dtype=torch.float32)
    x = torch.randn(1, 8, 16, 16)
    counts = []
    for module in (plain, SubPixelUpsample(plain.conv)):
        with FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == 2 * 9 * 8 * 8 * 32 * 32 and counts[1] * 9 == counts[0] * 4


@torch.no_grad()
def test_an_odd_output_size_runs_the_plain_upsample():
    plain = upsampler()
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64)
    out = SubPixelUpsample(plain.conv)(x, (11, 9))
    assert out.shape == (1, 5, 11, 9)
    torch.testing.assert_close(out, plain(x, (11, 9)), rtol=0, atol=1e-12)


@torch.no_grad()
def test_generator_with_lora_merged_unmerged_and_at_another_strength():
    generator, backbone = make_generator(stochastic=True, trained_seed=2, default_r=0.4)
    generator.double()
    fast = copy.deepcopy(generator)
    swaps = use_subpixel_upsampling(fast)
    # the tiny UNet and VAE decoder each have upsamplers; all of them are LoRA targets
    wrapped = [m for m in fast.modules() if isinstance(m, SubPixelUpsample)]
    assert len(swaps) == len(wrapped) >= 2 and all(isinstance(m.conv, LoraLayer) for m in wrapped)
    assert not any(isinstance(m, Upsample2D) for m in fast.modules())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in generator.named_parameters()]  # same names
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    e = embed(backbone).double()
    noise = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for r in (None, 0.7):  # unmerged: the LoRA delta at the call's scale is added to the weight
        torch.testing.assert_close(fast(x, e, r=r, noise=noise), generator(x, e, r=r, noise=noise), rtol=0, atol=1e-10)
    fast.merge_lora(0.4)
    torch.testing.assert_close(fast(x, e, r=0.4, noise=noise), generator(x, e, r=0.4, noise=noise), rtol=0, atol=1e-10)
    # disabled adapters: the base weights alone
    fast.unmerge_lora()
    conv = wrapped[0].conv
    base = conv.get_base_layer()
    h = torch.randn(1, base.in_channels, 4, 4, dtype=torch.float64)
    conv.enable_adapters(False)
    expected = base(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(wrapped[0](h), expected, rtol=0, atol=1e-12)
    conv.enable_adapters(True)
    assert (wrapped[0](h) - expected).abs().max() > 1e-6  # and enabled, the (non-zero) update is really added


def test_restore_puts_the_original_upsamplers_back():
    generator, _ = make_generator()
    before = [(n, m) for n, m in generator.named_modules() if isinstance(m, Upsample2D)]
    swaps = use_subpixel_upsampling(generator)
    assert len(swaps) == len(before) and not any(isinstance(m, Upsample2D) for m in generator.modules())
    restore_upsamplers(swaps)
    after = [(n, m) for n, m in generator.named_modules() if isinstance(m, Upsample2D)]
    assert [n for n, _ in after] == [n for n, _ in before] and all(a is b for (_, a), (_, b) in zip(after, before))
