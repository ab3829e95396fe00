import pytest
import torch
from conftest import embed, make_generator

from turbo_i2i.errors import BadInputError
from turbo_i2i.generator import OneStepGenerator, skip_channels


def test_skip_channels_follow_the_vae_config():
    assert skip_channels([128, 256, 512, 512]) == [(512, 512), (256, 512), (128, 512), (128, 256)]
    assert skip_channels([16, 16, 32, 32]) == [(32, 32), (16, 32), (16, 32), (16, 16)]


@pytest.mark.parametrize("task", ["paired", "unpaired"])
def test_output_shape_and_range(task):
    generator, backbone = make_generator(task, trained_seed=0)
    x = torch.rand(2, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        y = generator(x, embed(backbone))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1 and y.std() > 0


def test_zero_skip_convs_give_the_plain_vae_decode():
    generator, backbone = make_generator()
    vae = generator.vae["a2b"]
    with torch.no_grad():
        for conv in vae.decoder.skip_convs():
            conv.weight.zero_()
        x = torch.rand(1, 3, 32, 32)
        posterior, skips = vae.encode(x)
        plain = backbone.vae.encode(x).latent_dist
        assert torch.equal(posterior.mean, plain.mean)  # fresh LoRA (B = 0) leaves the encoder as it was
        z = posterior.mode()
        assert torch.equal(vae.decode(z, skips), backbone.vae.decode(z).sample)


def test_only_adapters_skip_convs_and_conv_in_are_trainable():
    generator, _ = make_generator("unpaired")
    generator.set_trainable(True)
    trainable = {n for n, p in generator.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".skip_conv_" in n or n.startswith("unet.conv_in.") for n in trainable)
    assert {"unet.conv_in.base_layer.weight", "vae.a2b.decoder.skip_conv_1.base_layer.weight"} <= trainable
    assert any("lora_A.default_decoder" in n for n in trainable) and any("vae.b2a" in n for n in trainable)
    frozen = {n for n, p in generator.named_parameters() if not p.requires_grad}
    assert "unet.down_blocks.0.resnets.0.conv1.base_layer.weight" in frozen
    assert "vae.a2b.encoder.conv_in.base_layer.weight" in frozen


def test_unpaired_directions_share_the_frozen_vae_and_differ():
    generator, backbone = make_generator("unpaired", trained_seed=0)
    a2b, b2a = generator.vae["a2b"], generator.vae["b2a"]
    base_a = a2b.encoder.down_blocks[0].resnets[0].conv1.base_layer.weight
    base_b = b2a.encoder.down_blocks[0].resnets[0].conv1.base_layer.weight
    assert base_a.data_ptr() == base_b.data_ptr()  # one frozen VAE, not a deep copy
    assert a2b.decoder.skip_conv_1.base_layer.weight.data_ptr() != b2a.decoder.skip_conv_1.base_layer.weight.data_ptr()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out_a = generator(x, embed(backbone), direction="a2b")
        out_b = generator(x, embed(backbone), direction="b2a")
    assert (out_a - out_b).abs().max() > 1e-3


def test_stochastic_r1_equals_deterministic_path_and_r_is_not_left_behind():
    generator, backbone = make_generator(stochastic=True, trained_seed=0)
    x, e = torch.rand(1, 3, 32, 32), embed(backbone)
    with torch.no_grad():
        deterministic = generator(x, e)
        at_one = generator(x, e, r=1.0, generator=torch.Generator().manual_seed(0))
        at_half = generator(x, e, r=0.5, generator=torch.Generator().manual_seed(0))
        again = generator(x, e)
    assert torch.equal(deterministic, at_one)
    assert (at_half - deterministic).abs().max() > 1e-3
    assert torch.equal(deterministic, again)  # r = 0.5 left no scale on LoRA, skips or conv_in


def test_same_seed_same_image_and_posterior_mode_is_deterministic():
    generator, backbone = make_generator(stochastic=True, trained_seed=0)
    x, e = torch.rand(1, 3, 32, 32), embed(backbone)

    def run(seed, **kw):
        with torch.no_grad():
            return generator(x, e, r=0.4, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(run(7, sample_posterior=True), run(7, sample_posterior=True))
    with torch.no_grad():
        assert torch.equal(generator(x, e), generator(x, e))


def test_bad_call_arguments_are_named():
    generator, backbone = make_generator()
    x, e = torch.rand(1, 3, 32, 32), embed(backbone)
    with pytest.raises(BadInputError, match="direction"):
        generator(x, e, direction="b2a")
    with pytest.raises(BadInputError, match="stochastic"):
        generator(x, e, r=0.5)


def test_gradients_reach_only_trained_weights():
    generator, backbone = make_generator("unpaired")
    generator.set_trainable(True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    loss = generator(x, embed(backbone), direction="b2a").square().mean()
    loss.backward()
    got_grad = {n for n, p in generator.named_parameters() if p.grad is not None}
    assert "unet.conv_in.base_layer.weight" in got_grad and "vae.b2a.decoder.skip_conv_1.base_layer.weight" in got_grad
    assert not any(n.startswith("vae.a2b.") for n in got_grad)  # the other direction is untouched


def test_config_is_taken_from_the_model_not_hard_coded():
    generator, _ = make_generator(unet_lora_rank=4, vae_lora_rank=2)
    assert isinstance(generator, OneStepGenerator)
    lora_a = generator.unet.down_blocks[0].attentions[0].proj_in.lora_A["default"].weight
    assert lora_a.shape[0] == 4
    assert generator.vae["a2b"].decoder.skip_conv_4.lora_A["vae_skip"].weight.shape[0] == 2


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the LoRA init of conv_in layers (left alone by randomize_trained) comes from here
        generator, backbone = make_generator(trained_seed=0)
        generator.set_trainable(True)
        if checkpointing:
            generator.enable_gradient_checkpointing()
        generator(
            torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), embed(backbone)
        ).sum().backward()
        grads.append({n: p.grad for n, p in generator.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_trained_digest_ignores_merging_and_tells_other_weights_and_precision():
    import torch

    generator, _ = make_generator(trained_seed=1)
    digest = generator.trained_digest()
    generator.merge_lora()
    assert generator.trained_digest() == digest  # merging rewrites base layers only, which it leaves out
    generator.unmerge_lora()
    assert generator.trained_digest() == digest
    with torch.no_grad():
        next(p for n, p in generator.named_parameters() if "lora_B" in n).view(-1)[0] += 1e-3
    assert generator.trained_digest() != digest
    assert generator.to(torch.bfloat16).trained_digest() != generator.to(torch.float32).trained_digest()
    # the Translator's channels-last layout (GPUs, half precision): same values, same digest (1x1 kernels raised)
    for dtype in (torch.float32, torch.bfloat16):
        generator.to(dtype=dtype, memory_format=torch.contiguous_format)
        plain = generator.trained_digest()
        generator.to(memory_format=torch.channels_last)
        assert generator.trained_digest() == plain
