"""A half precision the device only emulates gets a warning (same images, much later); fp32 never does."""

import logging

import pytest
import torch
from conftest import make_generator
from trainers import build_trainer

from turbo_i2i import precision
from turbo_i2i.benchmark import default_precision
from turbo_i2i.pipeline import Translator

CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["native", "emulated"])
def native(request, monkeypatch):
    """Make this CPU one with (or without) native half-precision arithmetic."""
    monkeypatch.setattr(precision, "_cpu_computes_natively", lambda dtype: request.param)
    return request.param


def test_half_precision_on_the_cpu_follows_its_instructions_and_fp32_is_always_native(native):
    assert precision.computes_natively(CPU, torch.bfloat16) is native
    assert precision.computes_natively(CPU, torch.float16) is native
    assert precision.computes_natively(CPU, torch.float32)
    assert default_precision(CPU) == (torch.bfloat16 if native else torch.float32)


def test_translator_warns_when_its_dtype_is_emulated(native, caplog):
    generator, backbone = make_generator()
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        Translator(generator, backbone, dtype=torch.bfloat16)
    warnings = emulation_warnings(caplog)
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("dtype bfloat16: this CPU has no native bfloat16")
        assert "Use float32" in warnings[0]


@pytest.mark.parametrize("fast", [True, False])
def test_a_loaded_model_warns_in_either_path(native, tiny_model_dir, caplog, fast):
    """fast=False loads the weights in the dtype directly (no cast in the Translator): it warns all the same."""
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        Translator.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, fast=fast)
    assert len(emulation_warnings(caplog)) == (0 if native else 1)


def test_translator_in_float32_never_warns(monkeypatch, caplog):
    monkeypatch.setattr(precision, "_cpu_computes_natively", lambda dtype: False)
    generator, backbone = make_generator()
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        Translator(generator, backbone, dtype=torch.float32)
        Translator(*make_generator(), dtype=None)
    assert emulation_warnings(caplog) == []


def emulation_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]


@pytest.mark.parametrize("task", ["paired", "unpaired"])
def test_training_warns_when_its_mixed_precision_is_emulated(task, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(precision, "_cpu_computes_natively", lambda dtype: False)
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        build_trainer(task, tmp_path, mixed_precision="bf16")
    assert [message.split(":")[0] for message in emulation_warnings(caplog)] == ["--mixed-precision bf16"]


@pytest.mark.parametrize("task", ["paired", "unpaired"])
def test_auto_mixed_precision_is_bf16_only_where_native(task, native, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        trainer = build_trainer(task, tmp_path, mixed_precision="auto")
    assert trainer.config.mixed_precision == ("bf16" if native else "no")
    frozen = next(p for p in trainer.unwrapped.unet.parameters() if not p.requires_grad)
    assert frozen.dtype == (torch.bfloat16 if native else torch.float32)  # stored in the half precision it chose
    assert emulation_warnings(caplog) == []


def test_explicit_mixed_precision_is_kept_and_the_demo_preset_chooses_automatically(native):
    from turbo_i2i.training.compute import resolve_mixed_precision
    from turbo_i2i.training.options import PRESETS, PairedTrainConfig

    assert PRESETS["demo-circles"]["mixed_precision"] == "auto"
    for given in ("no", "bf16", "fp16"):
        config = PairedTrainConfig(dataset="d", output_dir="o", mixed_precision=given)
        assert resolve_mixed_precision(config, CPU) is config
    config = PairedTrainConfig(dataset="d", output_dir="o", mixed_precision="auto")
    assert resolve_mixed_precision(config, CPU).mixed_precision == ("bf16" if native else "no")
