"""Training in half precision (``train_in_half_precision``): GroupNorms that keep bf16 activations in bf16 under
autocast (same numbers up to bf16 rounding, same parameters and shared modules; the memory they save is on CUDA, whose
autocast runs group_norm in fp32 while the CPU's keeps bf16: measured by benchmarks/train_unpaired.py, see the
README), and LoRA layers that no longer copy their inputs up to fp32 (bit for bit the same)."""

import collections

import pytest
import torch
from conftest import make_generator
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils._python_dispatch import TorchDispatchMode

from turbo_i2i.training.compute import (
    HalfPrecisionGroupNorm,
    cast_frozen,
    keep_lora_inputs_in_half_precision,
    keep_norms_in_half_precision,
)


def test_matches_group_norm_in_fp32_and_stays_bf16_under_autocast():
    torch.manual_seed(0)
    reference = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    norm = HalfPrecisionGroupNorm(4, 16, eps=1e-6)
    norm.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, 8, 8) * 3 + 1
    assert torch.equal(norm(x), reference(x))  # fp32 input: the plain GroupNorm
    half = x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(half.float()), rtol=1e-2, atol=2e-2)  # bf16 rounding only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = reference(half)
    assert torch.equal(out, plain)  # the CPU's kernel keeps bf16 itself: the same numbers as before the replacement
    out.float().square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32 and half.grad.isfinite().all()


def test_replacement_keeps_parameters_shared_modules_and_state_dict():
    generator, _ = make_generator("unpaired")
    state = generator.state_dict()
    norms_before = [m for m in generator.modules() if isinstance(m, torch.nn.GroupNorm)]
    params_before = {n: p for n, p in generator.named_parameters(remove_duplicate=False)}
    keep_norms_in_half_precision(generator)
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == len(norms_before) > 10 and all(type(m) is HalfPrecisionGroupNorm for m in norms)
    params = dict(generator.named_parameters(remove_duplicate=False))
    assert params.keys() == params_before.keys() and all(params[n] is params_before[n] for n in params)
    assert generator.state_dict().keys() == state.keys()
    a2b, b2a = generator.vae["a2b"], generator.vae["b2a"]
    assert a2b.decoder.conv_norm_out.weight is b2a.decoder.conv_norm_out.weight  # the frozen VAE stays shared


class CastCounter(TorchDispatchMode):
    """Counts dtype conversions (``aten._to_copy``) by (from, to) dtype."""

    def __init__(self):
        super().__init__()
        self.casts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten._to_copy:
            self.casts[(args[0].dtype, out.dtype)] += 1
        return out


def bf16_step(generator):
    """One forward and backward pass under bf16 autocast.

    Returns:
        (output, LoRA gradients, the casts counted, how many LoRA layers ran)
    """
    torch.manual_seed(1)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    embeds = torch.randn(1, 77, generator.unet.config.cross_attention_dim)
    calls = []
    for module in generator.modules():
        if isinstance(module, BaseTunerLayer):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    with CastCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = generator(x, embeds, "a2b")
        out.float().square().mean().backward()
    grads = {n: p.grad for n, p in generator.named_parameters() if "lora" in n and p.grad is not None}
    return out, grads, counter.casts, len(calls)


def test_lora_inputs_stay_in_half_precision_with_the_same_result():
    results = []
    for keep in (False, True):
        torch.manual_seed(0)  # the LoRA layers of conv_in keep peft's random init
        generator, _ = make_generator("unpaired", trained_seed=0)
        generator.set_trainable(True)
        cast_frozen(generator, torch.bfloat16)
        if keep:
            keep_lora_inputs_in_half_precision(generator)
        results.append(bf16_step(generator))
    (out_before, grads_before, casts_before, _), (out, grads, casts, ran) = results
    lora_layers = [m for m in generator.modules() if isinstance(m, BaseTunerLayer)]
    assert ran > 10 and not any(m.cast_input_dtype_enabled for m in lora_layers)
    # peft copied each LoRA layer's bf16 input up to fp32 and autocast copied it straight back, and the backward pass
    # did the same to its gradient: two up-casts and two down-casts fewer per layer that ran (what remains: the
    # fp32 adapter weights cast down for the products, their gradients cast up)
    for cast in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        assert casts_before[cast] - casts[cast] >= 2 * ran - 10, (cast, casts_before[cast], casts[cast], ran)
    assert torch.equal(out, out_before)
    assert grads.keys() == grads_before.keys() and len(grads) > 10
    assert all(torch.equal(grads[n], grads_before[n]) for n in grads)


@pytest.mark.parametrize("trainer_kind", ["paired", "unpaired"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_trainers_prepare_half_precision_only_in_bf16(tmp_path, precision, trainer_kind):
    from trainers import build_trainer

    trainer = build_trainer(trainer_kind, tmp_path, mixed_precision=precision)
    half = precision == "bf16"
    kinds = {type(m) for m in trainer.generator.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert kinds == ({HalfPrecisionGroupNorm} if half else {torch.nn.GroupNorm})
    lora_layers = [m for m in trainer.generator.modules() if isinstance(m, BaseTunerLayer)]
    assert lora_layers and all(m.cast_input_dtype_enabled is not half for m in lora_layers)
    frozen = {p.dtype for p in trainer.generator.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16 if half else torch.float32}
