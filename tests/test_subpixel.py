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


def test_training_gradients_equal_the_plain_upsamplers_in_float64():
    # what training needs beyond the forward: every trainable parameter (LoRA A and B of the upsampler convs
    # included, which only reach the output through the summed weight) gets the plain path's gradient
    generator, backbone = make_generator(task="unpaired", trained_seed=3, prompts={"a2b": "x", "b2a": "y"})
    generator.double().set_trainable(True)
    generator.train()
    fast = copy.deepcopy(generator)
    assert len(use_subpixel_upsampling(fast)) >= 2
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    e = embed(backbone).double()
    grads = []
    for model in (generator, fast):
        model.zero_grad()
        model(x, e, direction="b2a").square().mean().backward()
        # the other direction's VAE adapters get no gradient: None on both paths alike
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    upsampler_lora = [n for n in grads[0] if ".upsamplers.0.conv.lora_" in n]
    assert {n.split(".")[0] for n in upsampler_lora} == {"unet", "vae"}  # UNet's and the b2a VAE's upsamplers
    assert all(grads[0][n].abs().max() > 0 for n in upsampler_lora)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_lora_dropout_in_training_runs_the_plain_path():
    from peft import LoraConfig, inject_adapter_in_model

    plain = upsampler(dtype=torch.float32)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["conv"], lora_dropout=0.5), plain)
    with torch.no_grad():
        plain.conv.lora_B["default"].weight.normal_()
    fast = SubPixelUpsample(plain.conv)
    x = torch.randn(1, 6, 4, 4)
    outputs = []
    for module in (plain, fast):
        torch.manual_seed(0)  # the same dropout mask, if the same path draws it
        outputs.append(module.train()(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    with torch.no_grad():  # in eval mode dropout is the identity, and the summed weight applies again
        torch.testing.assert_close(fast.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kernels_of_an_unchanged_weight_are_computed_once(monkeypatch):
    from turbo_i2i import subpixel

    computed = []
    monkeypatch.setattr(subpixel, "phase_kernels", lambda w: computed.append(w) or phase_kernels(w))
    plain = upsampler()
    fast = SubPixelUpsample(plain.conv)
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-12)
    assert len(computed) == 1
    fast(x.contiguous(memory_format=torch.channels_last))  # kernels laid out for the other layout
    assert len(computed) == 2
    plain.conv.weight.mul_(2)  # an in-place change the version counter sees
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-12)
    assert len(computed) == 3
    # new data with the version counter kept: a freed address (which the allocator may hand out again for a tensor of
    # the same size; the kept kernels hold the old storage so it cannot) must not pass for the old weight
    plain, x = upsampler(128, 128, dtype=torch.float32), torch.randn(1, 128, 4, 4)
    fast = SubPixelUpsample(plain.conv)
    for _ in range(3):
        fast(x)
        shape = plain.conv.weight.shape
        plain.conv.weight.data = torch.empty(0)  # the old storage freed first, then one of its size
        plain.conv.weight.data = torch.randn(shape)
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)


def test_kernels_kept_in_inference_mode_do_not_break_a_later_backward():
    # a frozen, LoRA-free upsampler keeps its kernels under autograd too; ones made in inference mode cannot be saved
    plain = upsampler().requires_grad_(False)
    fast = SubPixelUpsample(plain.conv)
    with torch.inference_mode():
        fast(torch.randn(1, 6, 4, 4, dtype=torch.float64))
    grads = []
    for module in (plain, fast):
        x = torch.randn(1, 6, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_()
        module(x).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-10)


@torch.no_grad()
def test_kernels_follow_merging_at_another_strength():
    # peft merges into weight.data in place (same storage, same version): cached kernels of the first merge must not
    # outlive it
    generator, backbone = make_generator(stochastic=True, trained_seed=2, default_r=0.4)
    generator.double()
    fast = copy.deepcopy(generator)
    use_subpixel_upsampling(fast)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    e = embed(backbone).double()
    noise = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for r in (0.4, 0.9, 0.4):
        fast.merge_lora(r)
        torch.testing.assert_close(fast(x, e, r=r, noise=noise), generator(x, e, r=r, noise=noise), rtol=0, atol=1e-10)
        fast(x, e, r=0.7, noise=noise)  # unmerges: the base weights again
        expected = generator(x, e, r=0.2, noise=noise)
        torch.testing.assert_close(fast(x, e, r=0.2, noise=noise), expected, rtol=0, atol=1e-10)
