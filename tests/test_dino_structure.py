"""The DINO structure distance: the pure maths on hand-made matrices, and the metric on a tiny random timm ViT."""

import socket

import pytest
import timm
import torch
from safetensors.torch import save_file

from turbo_i2i.errors import BadInputError, TurboI2IError
from turbo_i2i.evaluation.dino_structure import (
    DINOStructureDistance,
    cosine_self_similarity,
    load_dino,
    self_similarity_mse,
    structure_distance_from_keys,
    tiny_dino,
)

# ------------------------------------------------------------------------------------------------ hand-made maths


def test_cosine_self_similarity_ignores_key_length_and_has_a_unit_diagonal():
    keys = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(0))
    sim = cosine_self_similarity(keys)
    assert sim.shape == (2, 10, 10)
    assert torch.allclose(sim.diagonal(dim1=1, dim2=2), torch.ones(2, 10), atol=1e-6)
    assert torch.allclose(sim, sim.transpose(1, 2))
    scale = torch.rand(2, 10, 1, generator=torch.Generator().manual_seed(1)) * 5 + 0.1
    assert torch.allclose(cosine_self_similarity(keys * scale), sim, atol=1e-6)  # e.g. a brightness change


def test_self_similarity_mse_on_hand_made_block_matrices():
    # Two regions of two tokens each: tokens resemble their own region only.
    layout = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    # Swapping tokens 1 and 2 across the regions (a shuffled structure) gives a checkerboard.
    shuffled = layout[[0, 2, 1, 3]][:, [0, 2, 1, 3]]
    assert torch.equal(shuffled, torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]))
    distances = self_similarity_mse(torch.stack([layout, layout]), torch.stack([layout, shuffled]))
    assert distances.tolist() == [0.0, 0.5]  # 8 of 16 entries differ by 1
    softened = layout * 0.9 + 0.05  # same layout, slightly different contrast
    assert float(self_similarity_mse(layout[None], softened[None])) == pytest.approx(0.0025)
    with pytest.raises(BadInputError, match="same token grid"):
        self_similarity_mse(layout[None], torch.ones(1, 5, 5))


def test_distance_from_keys_sees_structure_not_scale():
    region = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])  # tokens 0,1 vs 2,3
    brighter = region * torch.tensor([[2.0], [3.0], [0.5], [4.0]])
    shuffled = region[[0, 2, 1, 3]]
    d = structure_distance_from_keys(torch.stack([region, region]), torch.stack([brighter, shuffled]))
    assert float(d[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(d[1]) > 0.3


# ------------------------------------------------------------------------------------------ the tiny stand-in ViT


@pytest.fixture(scope="module")
def metric():
    return DINOStructureDistance(tiny_dino())


def scenes(size=64):
    """Two images with clear structure: a disc and a square on a plain background, in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for cx, cy, r in ((20, 40, 14), (34, 28, 10)):
        image = torch.tensor([-0.6, -0.2, 0.5]).view(3, 1, 1).repeat(1, size, size)
        image[:, (xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = torch.tensor([0.9, 0.1, -0.7])[:, None]
        image[:, (xx > 40) & (xx < 60) & (yy > 5) & (yy < 25)] = torch.tensor([0.2, 0.9, 0.3])[:, None]
        images.append(image)
    return torch.stack(images)


def shuffle_patches(images, patch=16, seed=0):
    n, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    tiles = images.reshape(n, c, gh, patch, gw, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, gh * gw, patch, patch)
    tiles = tiles[:, :, torch.randperm(gh * gw, generator=torch.Generator().manual_seed(seed))]
    return tiles.reshape(n, c, gh, gw, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def test_tiny_network_distance_is_zero_for_identical_images_large_for_shuffled_small_for_recoloured(metric):
    images = scenes()
    same = metric(images, images.clone())
    shuffled = metric(images, shuffle_patches(images))
    recoloured = metric(images, images[:, [2, 0, 1]])  # channels rotated: every colour changes, the layout not
    tinted = metric(images, (images * 0.7 + torch.tensor([0.2, -0.1, 0.1]).view(1, 3, 1, 1)).clamp(-1, 1))
    assert same.shape == (2,) and same.tolist() == [0.0, 0.0]
    assert bool((shuffled > 0.2).all())
    assert bool((recoloured < 0.05 * shuffled).all())
    assert bool((tinted < 0.1 * shuffled).all())


def test_keys_are_the_last_blocks_attention_keys_at_shorter_side_224(metric):
    vit = metric.vit
    images = scenes()[:, :, :32, :]  # 32 x 64 -> 224 x 448 -> 28 x 56 patches of 8 + CLS
    keys = metric.keys(images)
    assert keys.shape == (2, 1 + 28 * 56, 32)
    # The same keys computed by hand: the blocks run in turn, then the last block's norm1 and qkv projection.
    x = metric.preprocess(images, (224, 448))
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        qkv = vit.blocks[-1].attn.qkv(vit.blocks[-1].norm1(tokens))
    assert torch.allclose(keys, qkv[..., 32:64], atol=1e-5)
    assert not vit.blocks[-1].attn.qkv._forward_hooks  # the hook lives for one call only


def test_a_wide_picture_is_resized_as_torchvision_does_and_cut_to_whole_patches(metric):
    """16:9 (1280x720, 128x72) gave 224 x 398 px, which timm's patch embedding refuses (398 is not a multiple of 8):
    an AssertionError for the commonest video size."""
    assert metric.resized_size(720, 1280) == (224, 398) and metric.resized_size(667, 1000) == (224, 335)
    wide = torch.nn.functional.interpolate(scenes(), size=(72, 128), mode="bilinear", align_corners=False)
    assert metric.keys(wide).shape == (2, 1 + 28 * 49, 32)  # 398 px -> 49 whole patches, the rest dropped
    distances = metric(wide, wide.clone())
    assert distances.tolist() == [0.0, 0.0]
    assert bool((metric(wide, wide[:, [2, 0, 1]]) < 0.05 * metric(wide, shuffle_patches(wide, patch=8))).all())


def test_outputs_are_compared_on_the_inputs_grid(metric):
    images = scenes(size=32)
    upsampled = torch.nn.functional.interpolate(images, size=64, mode="bilinear", align_corners=False)
    assert bool((metric(images, upsampled) < 0.02).all())  # same picture at another size
    with pytest.raises(BadInputError, match="2 inputs but 1 outputs"):
        metric(images, images[:1])


def test_metric_keeps_the_network_frozen_in_eval_mode(metric):
    metric.train()
    assert not metric.vit.training and not any(p.requires_grad for p in metric.vit.parameters())


# ------------------------------------------------------------------------------------------------------ loading


def test_load_dino_offline_is_one_paragraph_naming_the_hub_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(TurboI2IError) as error:
        load_dino()
    message = str(error.value)
    assert error.value.exit_code == 1 and "\n" not in message
    repo = "timm/vit_base_patch8_224.dino"
    for text in (repo, f"hf download {repo}", str(tmp_path / "hf" / "hub"), "path=", "HF_HUB_OFFLINE"):
        assert text in message


def test_load_dino_from_a_local_file_or_folder(tmp_path):
    name = "vit_tiny_patch16_224.augreg_in21k"  # the same loading path as DINO ViT-B/8, 15x fewer weights
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False)
    (tmp_path / "w").mkdir()
    save_file(source.state_dict(), tmp_path / "w" / "model.safetensors")
    for path in (tmp_path / "w", tmp_path / "w" / "model.safetensors"):
        vit = load_dino(name, path=path, local_files_only=True)
        assert torch.equal(vit.patch_embed.proj.weight, source.patch_embed.proj.weight)
        assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    # dynamic_img_size: any aspect ratio runs, keys for every token.
    keys = DINOStructureDistance(vit, size=32).keys(torch.zeros(1, 3, 32, 48))
    assert keys.shape == (1, 1 + 2 * 3, 192)
    with pytest.raises(BadInputError, match="holds no model.safetensors"):
        load_dino(name, path=tmp_path)
    with pytest.raises(BadInputError, match="do not exist"):
        load_dino(name, path=tmp_path / "missing.safetensors")
    with pytest.raises(BadInputError, match="Unknown timm model"):
        load_dino("no_such_vit")
