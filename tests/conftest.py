"""Shared fixtures: tiny seeded models, never a network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere

import pytest
import torch

from turbo_i2i.backbone import load_backbone
from turbo_i2i.checkpoints import save_pretrained
from turbo_i2i.config import GeneratorConfig
from turbo_i2i.generator import OneStepGenerator


def make_generator(task="paired", stochastic=False, trained_seed=None, **config):
    """A generator on the built-in tiny backbone; with ``trained_seed`` its trained weights are made non-trivial
    (LoRA B is zero and skip convs are ~0 at init, which would hide bugs in the paths they feed)."""
    backbone = load_backbone("tiny")
    cfg = GeneratorConfig(base_model="tiny", task=task, stochastic=stochastic, **config)
    generator = OneStepGenerator(cfg, backbone.unet, backbone.vae, backbone.schedule)
    if trained_seed is not None:
        randomize_trained(generator, trained_seed)
    return generator, backbone


def randomize_trained(generator, seed, std=0.05):
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in generator.named_parameters():
            if generator.is_trained(name) and "conv_in" not in name:
                param.copy_(torch.randn(param.shape, generator=rng) * std)


def embed(backbone, prompt="a red circle on a blue background"):
    from turbo_i2i.backbone import encode_prompt

    return encode_prompt(backbone.tokenizer, backbone.text_encoder, [prompt])[0]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny paired model with non-trivial trained weights."""
    generator, _ = make_generator(trained_seed=1, prompts={"a2b": "a red circle on a blue background"})
    return save_pretrained(generator, tmp_path_factory.mktemp("models") / "tiny-paired")


@pytest.fixture
def one_thread():
    """Multi-threaded CPU kernels may sum in a different order from run to run; Adam turns such last-bit noise in
    near-zero gradients into lr-sized steps, so exact replay is compared with deterministic (one-thread) kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
