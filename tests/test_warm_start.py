"""Starting a run from an existing model (--from-model), with grown LoRA ranks, and the stochastic (r) variant."""

import numpy as np
import pytest
import torch
from conftest import embed
from PIL import Image

from turbo_i2i.checkpoints import load_pretrained
from turbo_i2i.errors import BadInputError
from turbo_i2i.pipeline import Translator
from turbo_i2i.training.circles import write_dataset
from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer
from turbo_i2i.training.pretrained import tiny_clip, tiny_lpips


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "circles"
    write_dataset(folder, n=10, seed=4, size=32)
    return folder


def trainer(dataset, out, **overrides):
    options = dict(
        dataset=str(dataset), output_dir=str(out), base_model="tiny", transform="no_resize", batch_size=4,
        max_steps=4, learning_rate=1e-3, lr_warmup_steps=0, disc="none", lambda_clipsim=0.0, eval_metrics="",
        report_to="none", checkpoint_every=100, eval_every=100,
    )  # fmt: skip
    options.update(overrides)
    return PairedTrainer(PairedTrainConfig(**options), loss_networks=(tiny_lpips(), tiny_clip()))


@torch.no_grad()
def outputs(generator, backbone_embeds, **kwargs):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return generator.eval()(x, backbone_embeds, **kwargs)


@pytest.mark.parametrize("ranks", [{}, {"unet_lora_rank": 16, "vae_lora_rank": 8}])
def test_a_warm_start_computes_what_the_source_computes(tiny_model_dir, dataset, tmp_path, ranks):
    source, backbone = load_pretrained(tiny_model_dir)
    run = trainer(dataset, tmp_path, from_model=str(tiny_model_dir), **ranks)
    e = embed(backbone)
    if ranks:  # the grown adapters really are bigger
        a = dict(run.unwrapped.named_parameters())["unet.down_blocks.0.attentions.0.proj_in.lora_A.default.weight"]
        assert a.shape[0] == 16
    torch.testing.assert_close(outputs(run.unwrapped, e), outputs(source, e), rtol=0, atol=1e-5)


def test_stochastic_training_from_a_deterministic_model(tiny_model_dir, dataset, tmp_path):
    source, backbone = load_pretrained(tiny_model_dir)
    run = trainer(dataset, tmp_path, from_model=str(tiny_model_dir), stochastic=True, unet_lora_rank=16)
    e = embed(backbone)
    assert run.unwrapped.config.stochastic and run.unwrapped.config.default_r == 0.4
    # at r = 1 the stochastic model starts as the deterministic one it came from
    torch.testing.assert_close(outputs(run.unwrapped, e, r=1.0), outputs(source, e), rtol=0, atol=1e-5)
    run.unwrapped.train()
    rs = []
    run.model.register_forward_pre_hook(lambda module, args, kwargs: rs.append(kwargs["r"]), with_kwargs=True)
    logs = run.train()
    assert len(set(rs)) == 4 and all(0 <= r <= 1 for r in rs) and np.isfinite(logs["loss_g"])
    translator = Translator.from_pretrained(tmp_path / "model")
    image = Image.fromarray(np.uint8(np.random.default_rng(0).integers(0, 256, (32, 32, 3))))
    faithful, free = (
        translator(image, prompt="a red circle", r=1.0),
        translator(image, prompt="a red circle", r=0.0, seed=1),
    )
    assert np.abs(np.asarray(faithful, dtype=int) - np.asarray(free, dtype=int)).mean() > 1  # r steers the output


def test_a_model_of_another_task_or_shape_is_refused(dataset, tmp_path):
    from conftest import make_generator

    from turbo_i2i.checkpoints import save_pretrained

    unpaired, _ = make_generator(task="unpaired", trained_seed=1)
    folder = save_pretrained(unpaired, tmp_path / "unpaired")
    with pytest.raises(BadInputError, match="another task"):
        trainer(dataset, tmp_path / "run", from_model=str(folder))
    smaller, _ = make_generator(trained_seed=1, unet_lora_rank=16)
    folder = save_pretrained(smaller, tmp_path / "rank16")
    with pytest.raises(BadInputError, match="only LoRA ranks may grow"):
        trainer(dataset, tmp_path / "run2", from_model=str(folder), unet_lora_rank=8)


def test_a_model_trained_from_scratch_brings_its_own_text_encoder(dataset, tmp_path):
    """The built-in demo model was trained from scratch (every weight, its text encoder too): a --train-all run
    starting from it gets its text encoder as well, so it computes what the source computes; a run of adapters only is
    refused, and saving such a model without its text encoder is refused (it would reload with another one)."""
    from turbo_i2i.checkpoints import save_pretrained
    from turbo_i2i.registry import load_model

    source, backbone = load_model("demo-circles")
    run = trainer(dataset, tmp_path / "run", base_model="tiny-circles", train_all=True, from_model="demo-circles")
    own, got = backbone.text_encoder.state_dict(), run.text_encoder.state_dict()
    assert own.keys() == got.keys() and all(torch.equal(own[k], got[k]) for k in own)
    e = embed(backbone)
    torch.testing.assert_close(outputs(run.unwrapped, e), outputs(source, e), rtol=0, atol=1e-5)
    with pytest.raises(BadInputError, match="add --train-all"):
        trainer(dataset, tmp_path / "adapters", base_model="tiny-circles", from_model="demo-circles")
    with pytest.raises(ValueError, match="pass its text_encoder"):
        save_pretrained(source, tmp_path / "resaved")


def test_stochastic_with_gradient_checkpointing_is_refused(dataset, tmp_path):
    with pytest.raises(BadInputError, match="gradient-checkpointing"):
        trainer(dataset, tmp_path, stochastic=True, gradient_checkpointing=True)
