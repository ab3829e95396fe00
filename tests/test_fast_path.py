"""The fast inference path (merged LoRA, channels-last, half precision) gives what the plain path gives."""

import json

import numpy as np
import pytest
import torch
from conftest import embed, make_generator
from PIL import Image

from turbo_i2i.backbone import BUILTIN_BACKBONES
from turbo_i2i.benchmark import markdown_table, run_benchmark
from turbo_i2i.pipeline import Translator
from turbo_i2i.subpixel import SubPixelUpsample

FP32_TOL = 1e-3  # max abs pixel difference on [0, 1] images (the bound for the fp32 fast path)
BF16_MEAN_TOL = 2 / 255


def inputs(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def to_unit(y):
    return (y.float() + 1) / 2


@torch.no_grad()
def test_merged_lora_matches_unmerged_and_unmerges_back():
    generator, backbone = make_generator(trained_seed=3)
    x, e = inputs(), embed(backbone)
    before = {n: p.clone() for n, p in generator.named_parameters()}
    plain = generator(x, e)
    generator.merge_lora()
    assert generator.merged_strength == 1.0
    base = dict(generator.named_parameters())["unet.down_blocks.0.attentions.0.proj_in.base_layer.weight"]
    assert not torch.equal(base, before["unet.down_blocks.0.attentions.0.proj_in.base_layer.weight"])  # really merged
    merged = generator(x, e)
    assert (to_unit(merged) - to_unit(plain)).abs().max() <= FP32_TOL
    with pytest.raises(RuntimeError, match="unmerge"):
        generator.trained_state_dict()  # saving merged weights would apply LoRA twice
    generator.unmerge_lora()
    for name, param in generator.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(generator(x, e), plain, rtol=0, atol=1e-5)


@torch.no_grad()
def test_per_call_r_unmerges_a_model_merged_at_another_strength():
    generator, backbone = make_generator(stochastic=True, trained_seed=4, default_r=0.4)
    reference, _ = make_generator(stochastic=True, trained_seed=4, default_r=0.4)
    x, e = inputs(), embed(backbone)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    generator.merge_lora(r=0.4)
    at_default = generator(x, e, r=0.4, noise=noise)
    torch.testing.assert_close(at_default, reference(x, e, r=0.4, noise=noise), rtol=0, atol=2e-3)
    assert generator.merged_strength == 0.4  # the merged strength served this call
    other = generator(x, e, r=0.7, noise=noise)
    assert generator.merged_strength is None  # another r: unmerged, and it stays correct
    torch.testing.assert_close(other, reference(x, e, r=0.7, noise=noise), rtol=0, atol=1e-5)
    torch.testing.assert_close(generator(x, e, r=0.4, noise=noise), at_default, rtol=0, atol=2e-3)


@torch.no_grad()
def test_unpaired_merge_keeps_the_shared_vae_and_both_directions_exact():
    generator, backbone = make_generator(task="unpaired", trained_seed=5)
    x, e = inputs() * 2 - 1, embed(backbone)
    plain = {d: generator(x, e, direction=d) for d in ("a2b", "b2a")}
    shared = generator.vae["b2a"].decoder.conv_in.base_layer.weight
    snapshot = shared.clone()
    generator.merge_lora()
    assert generator.vae["a2b"].decoder.conv_in.base_layer.weight is shared  # still one tensor for both
    assert torch.equal(shared, snapshot)  # a direction's VAE adapter is not folded into the shared weights
    for d in ("a2b", "b2a"):
        assert (to_unit(generator(x, e, direction=d)) - to_unit(plain[d])).abs().max() <= FP32_TOL


def is_nchw(translator):
    weight = translator.generator.vae[translator.config.default_direction].encoder.conv_in.weight  # 3x3: unambiguous
    return weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)


def translators(model_dir, **kwargs):
    return Translator.from_pretrained(model_dir, fast=False), Translator.from_pretrained(model_dir, **kwargs)


def pixels(image):
    return np.asarray(image).astype(np.float64) / 255


def test_translator_fast_fp32_matches_the_plain_path(tiny_model_dir):
    plain, fast = translators(tiny_model_dir)
    assert fast.generator.merged_strength == 1.0 and plain.generator.merged_strength is None
    assert not fast.channels_last and is_nchw(fast)  # fp32 on the CPU: NHWC measured no faster
    assert any(isinstance(m, SubPixelUpsample) for m in fast.generator.modules())
    assert not any(isinstance(m, SubPixelUpsample) for m in plain.generator.modules())
    images = [Image.fromarray(np.uint8(np.random.default_rng(i).integers(0, 256, (40, 48, 3)))) for i in range(3)]
    for a, b in zip(plain(images), fast(images)):
        # PIL output is rounded to 1/255: a difference below FP32_TOL can flip at most one rounding step
        assert np.abs(pixels(a) - pixels(b)).max() <= 1 / 255 + 1e-9
    x = inputs(size=40)
    e = plain.encode_prompt("a red circle on a blue background")
    with torch.no_grad():
        y_plain = plain.generator(x, e)
        y_fast = fast.generator(x.contiguous(memory_format=torch.channels_last), e)
    assert (to_unit(y_fast) - to_unit(y_plain)).abs().max() <= FP32_TOL


def test_compiled_translator_gives_the_eager_images_from_one_graph(tiny_model_dir):
    """The whole generator pass is one compiled graph (so CUDA graphs keep the skips inside it); seeded calls and a
    second image of the same size add none, and the images are the eager ones. ("reduce-overhead" is the default
    mode on the CPU, which has no CUDA graphs.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = Translator.from_pretrained(tiny_model_dir)
    compiled = Translator.from_pretrained(tiny_model_dir, compile="reduce-overhead")
    images = [Image.fromarray(np.uint8(np.random.default_rng(i).integers(0, 256, (40, 48, 3)))) for i in range(2)]
    outputs = [compiled(images[0]), compiled(images[1], seed=3), compiled(images[0], seed=4)]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for image, out in zip([*images, images[0]], outputs):
        assert np.abs(pixels(eager(image)) - pixels(out)).max() <= 1 / 255 + 1e-9


@pytest.mark.parametrize("compile,mode", [(True, "default"), ("max-autotune", "max-autotune")])
def test_compile_true_or_a_mode_reaches_torch_compile(tiny_model_dir, monkeypatch, compile, mode):
    """The mode reaches torch.compile, and translations (``__call__`` and ``forward``, which the benchmark's
    equivalence check uses) go through what it returned."""
    compiled, passes = [], []

    def fake_compile(model, **kwargs):
        compiled.append((model, kwargs))
        return lambda *args, **kw: passes.append(len(args[0])) or model(*args, **kw)

    monkeypatch.setattr(torch, "compile", fake_compile)
    translator = Translator.from_pretrained(tiny_model_dir, compile=compile)
    assert compiled == [(translator.generator, {"mode": mode})]
    translator([Image.new("RGB", (16, 16))] * 2)
    translator.forward(torch.zeros(1, 3, 16, 16), translator.encode_prompt("a red circle on a blue background"))
    assert passes == [2, 1]


def test_translator_bf16_is_within_two_levels_on_average(tiny_model_dir):
    plain, fast = translators(tiny_model_dir, dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    assert fast.channels_last and not is_nchw(fast) and is_nchw(plain)  # oneDNN's bf16 convolutions: faster in NHWC
    images = [Image.fromarray(np.uint8(np.random.default_rng(i).integers(0, 256, (32, 32, 3)))) for i in range(4)]
    diffs = [np.abs(pixels(a) - pixels(b)).mean() for a, b in zip(plain(images), fast(images))]
    assert max(diffs) <= BF16_MEAN_TOL


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """The built-in tiny backbone's configs in the layout of shared/reference/sd-turbo-architecture."""
    root = tmp_path_factory.mktemp("reference")
    spec = BUILTIN_BACKBONES["tiny"]
    for part in ("unet", "vae", "text_encoder"):
        (root / part).mkdir()
        (root / part / "config.json").write_text(json.dumps(spec[part]))
    return root


def test_benchmark_reports_flops_equivalence_and_a_table(tiny_reference):
    report = run_benchmark(
        tiny_reference, device="cpu", sizes=(32,), batches=(1, 2), repeats=1, precision=torch.bfloat16,
        progress=lambda line: None,
    )  # fmt: skip
    flops = report["flops"]["32"]
    parts = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
    assert all(flops[p] > 0 for p in parts) and flops["total"] == sum(flops[p] for p in parts)
    assert 0 < report["fast_flops"]["32"] < flops["total"]  # sub-pixel upsampling runs fewer
    assert {(r["mode"], r["batch"]) for r in report["results"]} == {
        (m, b) for m in ("baseline", "fast") for b in (1, 2)
    }
    assert all(r["median_s_per_image"] > 0 and r["peak_memory_gib"] > 0 for r in report["results"])
    eq = report["equivalence"]
    assert eq["fast_float32"]["max_abs"] <= FP32_TOL
    assert eq["fast_bfloat16"]["mean_abs"] <= BF16_MEAN_TOL
    table = markdown_table(report)
    assert table.count("| baseline |") == 2 and table.count("| fast |") == 2 and "| 32 |" in table
    assert f"{report['fast_flops']['32'] / 1e12:.3f} TFLOP at 32 px" in table


def test_benchmark_names_a_folder_without_configs(tmp_path):
    from turbo_i2i.errors import BadInputError

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(BUILTIN_BACKBONES["tiny"]["unet"]))
    with pytest.raises(BadInputError, match="missing vae/config.json, text_encoder/config.json"):
        run_benchmark(tmp_path, device="cpu", sizes=(32,), batches=(1,), repeats=1, progress=lambda line: None)


def test_bench_command_writes_the_json_and_the_table(tiny_reference, tmp_path, capsys):
    from turbo_i2i.cli import main

    out = tmp_path / "results" / "bench"
    args = ["bench", "--reference", str(tiny_reference), "--device", "cpu", "--sizes", "32", "--batches", "1"]
    assert main([*args, "--repeats", "1", "--precision", "bfloat16", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["mode"] for r in report["results"]] == ["baseline", "fast"] and report["fast_precision"] == "bfloat16"
    assert out.with_suffix(".md").read_text() in capsys.readouterr().out
    assert main([*args, "--repeats", "0"]) == 2
