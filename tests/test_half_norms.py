"""GroupNorms that keep bf16 activations in bf16 under autocast: same numbers up to bf16 rounding, same parameters
and shared modules. (The memory they save is on CUDA, whose autocast runs group_norm in fp32 while the CPU's keeps
bf16: measured by benchmarks/train_unpaired.py, see the README.)"""

import pytest
import torch
from conftest import make_generator

from turbo_i2i.training.loop import HalfPrecisionGroupNorm, keep_norms_in_half_precision


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


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_unpaired_trainer_replaces_the_norms_only_in_bf16(tmp_path, precision):
    from test_train_unpaired import make_trainer, make_unpaired

    trainer = make_trainer(make_unpaired(tmp_path / "data"), tmp_path / "run", mixed_precision=precision)
    kinds = {type(m) for m in trainer.generator.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert kinds == ({HalfPrecisionGroupNorm} if precision == "bf16" else {torch.nn.GroupNorm})
