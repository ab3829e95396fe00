"""Plain (matrix-product) attention for CPU training: the same outputs and gradients as PyTorch's fused attention,
in every attention layer of the generator and the text encoder. (Its speed is measured, not asserted: see
``use_math_attention``'s docstring.)"""

import torch
from conftest import make_generator
from diffusers.models.attention_processor import Attention, AttnProcessor

from turbo_i2i.backbone import tokenize
from turbo_i2i.training.compute import use_math_attention


def _outputs_and_grads(generator, text_encoder, x, ids):
    generator.zero_grad(set_to_none=True)
    text_encoder.zero_grad(set_to_none=True)
    embeds = text_encoder(ids)[0]
    out = generator(x, embeds)
    (out.square().mean() + embeds.square().mean()).backward()
    params = list(generator.named_parameters()) + list(text_encoder.named_parameters())
    return out.detach(), embeds.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}


def test_math_attention_gives_the_fused_kernels_outputs_and_gradients():
    torch.manual_seed(0)
    generator, backbone = make_generator(train_all=True)
    generator.set_trainable(True)
    text_encoder = backbone.text_encoder.requires_grad_(True)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ids = tokenize(backbone.tokenizer, ["a red circle on a blue background", "green squares, white background"])
    fused = _outputs_and_grads(generator, text_encoder, x, ids)

    use_math_attention(generator)
    use_math_attention(text_encoder)
    layers = [m for m in generator.modules() if isinstance(m, Attention)]
    assert len(layers) >= 4 and all(type(m.processor) is AttnProcessor for m in layers)  # UNet and VAE
    assert text_encoder.config._attn_implementation == "eager"
    plain = _outputs_and_grads(generator, text_encoder, x, ids)

    torch.testing.assert_close(plain[0], fused[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain[1], fused[1], rtol=1e-4, atol=1e-5)
    assert plain[2].keys() == fused[2].keys() and len(plain[2]) > 50
    for name, grad in fused[2].items():
        torch.testing.assert_close(plain[2][name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_the_paired_trainer_uses_math_attention_on_the_cpu(tmp_path):
    from trainers import build_trainer

    trainer = build_trainer("paired", tmp_path, disc="none")
    layers = [m for m in trainer.generator.modules() if isinstance(m, Attention)]
    assert layers and all(type(m.processor) is AttnProcessor for m in layers)
    assert trainer.text_encoder.config._attn_implementation == "eager"
