"""Weights kept in oneDNN's layout give the numbers the plain layers give, and follow every change of the weights."""

import copy

import pytest
import torch
from conftest import embed, make_generator
from peft.tuners.lora import LoraLayer
from torch import nn

from turbo_i2i.pipeline import Translator
from turbo_i2i.precision import computes_natively
from turbo_i2i.prepack import PackedConv2d, PackedLinear, prepack_weights
from turbo_i2i.subpixel import SubPixelUpsample, use_subpixel_upsampling

needs_bf16 = pytest.mark.skipif(
    not computes_natively(torch.device("cpu"), torch.bfloat16), reason="no native bf16 on this CPU: nothing is packed"
)


def packed_layers(model):
    return [m for m in model.modules() if isinstance(m, (PackedConv2d, PackedLinear))]


def test_swap_keeps_names_parameters_and_peft_layers():
    generator, _ = make_generator(stochastic=True, trained_seed=2, default_r=0.4)
    params = dict(generator.named_parameters())
    plain = [n for n, m in generator.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert prepack_weights(generator) == len(plain) > 20
    assert dict(generator.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in generator.named_parameters())  # shared, not copied
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in generator.modules())
    # peft's LoRA layers hold the twins as their base layers
    assert all(isinstance(m.get_base_layer(), (PackedConv2d, PackedLinear)) for m in generator.modules()
               if isinstance(m, LoraLayer))  # fmt: skip


@needs_bf16
@torch.no_grad()
def test_packed_layers_compute_what_the_plain_ones_compute():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1).bfloat16()
    linear = nn.Linear(16, 40).bfloat16()
    holder = nn.Sequential(conv, linear)
    prepack_weights(holder)
    twin_conv, twin_linear = holder
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 16, 9, 7).bfloat16().contiguous(memory_format=layout)
        torch.testing.assert_close(twin_conv(x), conv(x), rtol=0, atol=0)
    tokens = torch.randn(3, 5, 16).bfloat16()
    torch.testing.assert_close(twin_linear(tokens), linear(tokens), rtol=1e-2, atol=1e-2)
    assert twin_conv._packed._key is not None and twin_linear._packed._key is not None  # the packed path ran


@needs_bf16
def test_autograd_float32_and_changed_weights_run_unpacked_or_repacked():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    twin = prepack_weights(holder := nn.Sequential(conv)) and holder[0]
    x = torch.randn(1, 8, 6, 6)
    twin(x)  # float32: not packed
    assert twin._packed._key is None
    twin.bfloat16()
    xb = x.bfloat16().requires_grad_()
    twin(xb).sum().backward()  # autograd: not packed, and gradients reach the input
    assert twin._packed._key is None and xb.grad is not None
    with torch.no_grad():
        before = twin(xb)
        assert twin._packed._key is not None
        twin.weight.mul_(-1)  # an in-place change: the next call packs the new weight
        torch.testing.assert_close(twin(xb), -before + 2 * twin.bias.view(1, -1, 1, 1), rtol=1e-2, atol=1e-2)


@needs_bf16
@torch.no_grad()
def test_packed_generator_follows_merging_and_per_call_r():
    # peft writes merged weights into weight.data in place: a pack made at one strength must not outlive it
    generator, backbone = make_generator(stochastic=True, trained_seed=2, default_r=0.4)
    use_subpixel_upsampling(generator)
    generator.bfloat16().eval()
    packed = copy.deepcopy(generator)
    assert prepack_weights(packed) > 20
    x = torch.rand(1, 3, 32, 32).bfloat16()
    e = embed(backbone).bfloat16()
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16()

    def check(r):
        difference = (packed(x, e, r=r, noise=noise) - generator(x, e, r=r, noise=noise)).abs()
        # bf16 noise (packed linear layers round differently): mean 0.003-0.005, max 0.04 here; a pack of the merged
        # weights kept after unmerging gave mean 0.085, max 0.64
        assert difference.mean() < 0.01 and difference.max() < 0.1

    for model in (generator, packed):
        model.merge_lora(0.4)
    check(0.4)
    check(0.9)  # unmerges both
    for model in (generator, packed):
        model.merge_lora(0.4)
    check(0.4)
    assert any(m._packed._key is not None for m in packed_layers(packed))
    upsamplers = [m for m in packed.modules() if isinstance(m, SubPixelUpsample)]
    assert upsamplers and all(m._kernels._key is not None for m in upsamplers)


def test_translator_packs_on_the_cpu_in_its_fast_path_only(tiny_model_dir):
    assert packed_layers(Translator.from_pretrained(tiny_model_dir).generator)
    assert not packed_layers(Translator.from_pretrained(tiny_model_dir, fast=False).generator)
