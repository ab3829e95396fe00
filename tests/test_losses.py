"""Pretrained-net loaders (offline behaviour) and the paired training losses, on tiny random stand-ins only."""

import socket

import pytest
import torch
import torchvision

from turbo_i2i.errors import BadInputError, TurboI2IError
from turbo_i2i.training.losses import CLIPSimLoss, LPIPSLoss, loss_l2
from turbo_i2i.training.options import PairedTrainConfig
from turbo_i2i.training.pretrained import load_clip, load_lpips, tiny_clip, tiny_lpips


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches, downloads off, and any attempt to open a connection fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    return tiny_clip()


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_one_paragraph_missing_weights(error, *must_mention):
    message = str(error.value)
    assert error.value.exit_code == 1 and not isinstance(error.value, BadInputError)
    assert "\n" not in message
    for text in ("HF_HUB_OFFLINE", "path=", *must_mention):
        assert text in message


def test_load_lpips_offline_names_the_cache_file_and_how_to_provide_it(offline):
    with pytest.raises(TurboI2IError) as error:
        load_lpips()
    expected = offline / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert_one_paragraph_missing_weights(error, str(expected), "TORCH_HOME", "download.pytorch.org")


def test_load_lpips_copies_a_cached_torchvision_trunk(offline):
    # AlexNet: the same loading path as VGG16 with a checkpoint small enough for a unit test.
    features = torchvision.models.alexnet().features.state_dict()
    checkpoints = offline / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.items()}, checkpoints / "alexnet-owt-7be5be79.pth")
    net = load_lpips("alex")
    trunk = net.net.state_dict()  # lpips keeps torchvision's layer indices: slice1.0 ... slice5.10
    assert torch.equal(trunk["slice1.0.weight"], features["0.weight"])
    assert torch.equal(trunk["slice5.10.weight"], features["10.weight"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_load_lpips_bad_input():
    with pytest.raises(BadInputError, match="squeeze"):
        load_lpips("resnet")
    with pytest.raises(BadInputError, match="does not exist"):
        load_lpips(path="/nonexistent/vgg16.pth")


def test_load_clip_offline_names_the_hub_repo_and_how_to_provide_it(offline):
    with pytest.raises(TurboI2IError) as error:
        load_clip("ViT-B-32", "openai")
    repo = "timm/vit_base_patch32_clip_224.openai"
    assert_one_paragraph_missing_weights(error, repo, f"hf download {repo}", str(offline / "hf" / "hub"))


def test_load_clip_bad_input(offline):
    with pytest.raises(BadInputError, match="list_models"):
        load_clip("ViT-Nope")
    with pytest.raises(BadInputError, match="openai"):
        load_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(BadInputError, match="does not exist"):
        load_clip("ViT-B-32", path=offline / "missing.safetensors")


def test_tiny_clip_is_frozen_with_the_real_tokenizer(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    tokens = tokenizer(["a red circle", "a blue square"])
    assert tokens.shape == (2, 77) and tokens[0, 0] == 49406  # <|startoftext|>
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.encode_text(tokens).shape == (2, 32)


def test_loss_l2_is_mse():
    a, b = images(seed=0), images(seed=1)
    assert torch.isclose(loss_l2(a, b), ((a - b) ** 2).mean())


def test_lpips_loss_zero_for_identical_and_grows_with_noise():
    loss = LPIPSLoss(tiny_lpips())
    x = images()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    distances = [loss(x, x + s * noise).item() for s in (0.0, 0.05, 0.2, 0.5)]
    assert distances[0] == 0.0
    assert distances == sorted(distances) and distances[1] > 0


def test_lpips_loss_keeps_the_net_frozen_in_train_mode():
    loss = LPIPSLoss(tiny_lpips()).train()
    assert loss.training and not loss.net.training
    x = images().requires_grad_()
    loss(x, images(seed=1)).backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_lpips_loss_is_computed_in_fp32_under_a_trainers_autocast(half):
    """LPIPS normalises feature maps by their root sum of squares, which overflows fp16: under the trainers' autocast
    the loss is still the fp32 one (the tiny stand-in gave NaN in fp16 before), with an fp32 gradient."""
    loss = LPIPSLoss(tiny_lpips())
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = loss(x, y)
    (expected_grad,) = torch.autograd.grad(expected, x)
    with torch.autocast("cpu", dtype=half):
        value = loss(x.to(half), y.to(half))
    (grad,) = torch.autograd.grad(value, x)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, expected, rtol=1e-2, atol=1e-3)  # the inputs were rounded to ``half``
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert torch.nn.functional.cosine_similarity(grad.flatten(), expected_grad.flatten(), dim=0) > 0.99


def test_clipsim_loss_range_and_gradient(clip_and_tokenizer):
    loss = CLIPSimLoss(*clip_and_tokenizer)
    x = images(n=3, size=48).requires_grad_()  # not CLIP's 64 px: the loss resizes
    value = loss(x, ["a red circle", "a blue square", "a green triangle"])
    assert value.shape == () and 0.0 <= value.item() <= 2.0
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


def test_clipsim_loss_matches_the_definition(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    loss = CLIPSimLoss(model, tokenizer)
    x = images(n=2, size=64)
    # 64 px is the tiny tower's size: no resize, just [-1, 1] -> [0, 1] -> CLIP mean/std.
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    image = model.encode_image(((x * 0.5 + 0.5) - mean) / std, normalize=True)
    text = model.encode_text(tokenizer(["a cat", "a dog"]), normalize=True)
    expected = (1 - torch.nn.functional.cosine_similarity(image, text)).mean()
    assert torch.isclose(loss(x, ["a cat", "a dog"]), expected, atol=1e-6)


def test_clipsim_loss_caches_caption_embeddings(clip_and_tokenizer, monkeypatch):
    model, tokenizer = clip_and_tokenizer
    loss = CLIPSimLoss(model, tokenizer)
    encoded = []
    original = model.encode_text

    def counting_encode_text(tokens, normalize=False):
        encoded.append(len(tokens))
        return original(tokens, normalize=normalize)

    monkeypatch.setattr(model, "encode_text", counting_encode_text)
    first = loss(images(), ["a cat", "a cat"])
    again = loss(images(), ["a cat", "a cat"])
    assert encoded == [1] and torch.equal(first, again)  # a repeated caption is encoded once, then never again
    loss(images(), ["a cat", "a dog"])
    assert encoded == [1, 1]  # only the new caption
    loss(images(), "a dog")  # one caption for the whole batch
    assert encoded == [1, 1]


def test_a_caption_embedding_does_not_depend_on_the_captions_encoded_with_it(clip_and_tokenizer):
    """Each caption is encoded on its own: in one batch the text tower rounds differently (1 float32 ulp), so the
    cached value would depend on the run's history and a resumed run (empty cache) would drift from an uninterrupted
    one."""
    model, tokenizer = clip_and_tokenizer
    captions = ["a cat", "a dog on a sofa", "three red apples", "a long caption about a small blue boat at sea"]
    together = CLIPSimLoss(model, tokenizer).caption_embeddings(captions, torch.device("cpu"))
    for i, caption in enumerate(captions):
        alone = CLIPSimLoss(model, tokenizer).caption_embeddings([caption], torch.device("cpu"))
        assert torch.equal(alone[0], together[i]), caption


def test_clipsim_loss_cache_is_bounded(clip_and_tokenizer):
    loss = CLIPSimLoss(*clip_and_tokenizer, cache_size=2)
    for caption in ("one", "two", "three"):
        loss(images(n=1), [caption])
    assert list(loss._cache) == ["two", "three"]


def test_clipsim_loss_rejects_caption_count_mismatch(clip_and_tokenizer):
    with pytest.raises(BadInputError, match="2 images but 1 captions"):
        CLIPSimLoss(*clip_and_tokenizer)(images(n=2), ["only one"])


def test_paired_loss_weights_are_the_papers():
    config = PairedTrainConfig(dataset="d", output_dir="o")
    weights = (config.lambda_l2, config.lambda_lpips, config.lambda_clipsim, config.lambda_gan)
    assert weights == (1.0, 5.0, 5.0, 0.5)
