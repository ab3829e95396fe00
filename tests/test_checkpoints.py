import pickle

import pytest
import torch
from conftest import embed, make_generator
from official_format import official_paired, official_unpaired
from safetensors.torch import load_file, save_file

from turbo_i2i.backbone import load_backbone
from turbo_i2i.checkpoints import WEIGHTS_NAME, convert_official, load_official, load_pretrained, save_pretrained
from turbo_i2i.errors import BadInputError


@pytest.mark.parametrize("task,stochastic", [("paired", False), ("paired", True), ("unpaired", False)])
def test_save_load_round_trip_is_bit_exact(tmp_path, task, stochastic):
    generator, backbone = make_generator(task, stochastic, trained_seed=3)
    with torch.no_grad():  # a retrained conv_in must survive the round trip too (the public code drops it)
        generator.unet.conv_in.conv_in_curr.weight.add_(0.1) if stochastic else None
    save_pretrained(generator, tmp_path / "m")
    loaded, loaded_backbone = load_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    kwargs = {"r": 0.6, "generator": torch.Generator().manual_seed(1)} if stochastic else {}
    with torch.no_grad():
        for direction in generator.config.directions:
            expected = generator(x, embed(backbone), direction, **kwargs)
            kwargs = {**kwargs, "generator": torch.Generator().manual_seed(1)} if stochastic else {}
            got = loaded(x, embed(loaded_backbone), direction, **kwargs)
            assert torch.equal(expected, got)
    saved = load_file(tmp_path / "m" / WEIGHTS_NAME)
    assert set(saved) == {n for n, _ in generator.named_parameters() if generator.is_trained(n)}
    assert any(k.startswith("unet.conv_in.") for k in saved)


def test_shape_mismatch_names_the_first_tensor(tmp_path):
    generator, _ = make_generator()
    folder = save_pretrained(generator, tmp_path / "m")
    state = load_file(folder / WEIGHTS_NAME)
    state["unet.conv_in.weight"] = torch.zeros(7, 4, 3, 3)
    save_file(state, folder / WEIGHTS_NAME)
    with pytest.raises(BadInputError, match=r"unet\.conv_in\.weight.*\(7, 4, 3, 3\).*\(32, 4, 3, 3\)"):
        load_pretrained(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    generator, _ = make_generator()
    folder = save_pretrained(generator, tmp_path / "m")
    state = load_file(folder / WEIGHTS_NAME)
    save_file({**state, "unet.extra.weight": torch.zeros(1)}, folder / WEIGHTS_NAME)
    with pytest.raises(BadInputError, match="unet.extra.weight"):
        load_pretrained(folder)
    del state["vae.a2b.decoder.skip_conv_2.base_layer.weight"]
    save_file(state, folder / WEIGHTS_NAME)
    with pytest.raises(BadInputError, match="lacks 1 trained tensors"):
        load_pretrained(folder)


def _tiny_parts():
    backbone = load_backbone("tiny")
    return backbone.unet, backbone.vae


@pytest.mark.parametrize("stochastic", [False, True])
def test_official_paired_checkpoint_imports_and_acts(tmp_path, stochastic):
    unet, vae = _tiny_parts()
    state = official_paired(unet, vae, stochastic=stochastic)
    torch.save(state, tmp_path / "official.pkl")
    generator, backbone = load_official(tmp_path / "official.pkl", "tiny")
    params = dict(generator.named_parameters())
    # every tensor of the file lands where its name says (VAE under direction a2b), exactly
    for key, value in state["state_dict_unet"].items():
        if "conv_in_pretrained" not in key:
            assert torch.equal(params[f"unet.{key}"], value), key
    for key, value in state["state_dict_vae"].items():
        assert torch.equal(params[f"vae.a2b.{key}"], value), key
    assert generator.config.stochastic == stochastic and generator.config.unet_lora_alpha == 8.0
    # the UNet computes exactly what the official peft-wrapped UNet computes with those weights
    x = torch.randn(1, 4, 4, 4)
    t = torch.tensor([999])
    e = embed(backbone)
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=e).sample if not stochastic else None
        ours = generator.unet(x, t, encoder_hidden_states=e).sample
        if theirs is not None:
            assert torch.equal(ours, theirs)
        # and the weights change the translation
        fresh, fresh_backbone = make_generator(stochastic=stochastic)
        image = torch.rand(1, 3, 32, 32)
        assert (generator(image, e) - fresh(image, embed(fresh_backbone))).abs().max() > 1e-3


def test_official_unpaired_checkpoint_imports_both_directions(tmp_path):
    unet, vae = _tiny_parts()
    state = official_unpaired(unet, vae)
    torch.save(state, tmp_path / "official.pkl")
    generator, backbone = load_official(tmp_path / "official.pkl", "tiny", prompts={"a2b": "night"})
    params = dict(generator.named_parameters())
    for key, value in state["sd_decoder"].items():
        ours = "unet." + key.replace(".lora_A.", ".lora_A.default_decoder.").replace(
            ".lora_B.", ".lora_B.default_decoder."
        )
        assert torch.equal(params[ours], value), key
    for prefix, direction in (("vae.", "a2b"), ("vae_b2a.", "b2a")):
        key = f"{prefix}decoder.skip_conv_3.lora_B.vae_skip.weight"
        assert torch.equal(
            params[f"vae.{direction}.decoder.skip_conv_3.lora_B.vae_skip.weight"], state["sd_vae_enc"][key]
        )
    # the UNet conv_in base comes from the backbone (the official files store only its LoRA)
    assert torch.equal(params["unet.conv_in.base_layer.weight"], load_backbone("tiny").unet.conv_in.weight)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        e = embed(backbone)
        assert (generator(x, e, "a2b") - generator(x, e, "b2a")).abs().max() > 1e-3
        assert torch.equal(
            unet(torch.ones(1, 4, 4, 4), torch.tensor([999]), encoder_hidden_states=e).sample,
            generator.unet(torch.ones(1, 4, 4, 4), torch.tensor([999]), encoder_hidden_states=e).sample,
        )


def test_old_peft_spelling_without_base_layer_is_accepted(tmp_path):
    unet, vae = _tiny_parts()
    state = official_paired(unet, vae)
    state["state_dict_vae"] = {k.replace(".base_layer", ""): v for k, v in state["state_dict_vae"].items()}
    torch.save(state, tmp_path / "old.pkl")
    generator, _ = load_official(tmp_path / "old.pkl", "tiny")
    weight = state["state_dict_vae"]["decoder.skip_conv_1.weight"]
    assert torch.equal(generator.vae["a2b"].decoder.skip_conv_1.base_layer.weight, weight)


def test_modules_the_file_never_adapted_keep_a_zero_update(tmp_path):
    unet, vae = _tiny_parts()
    state = official_paired(unet, vae)
    module = "down_blocks.0.downsamplers.0.conv"
    for part in ("lora_A", "lora_B"):
        del state["state_dict_unet"][f"{module}.{part}.default.weight"]
    torch.save(state, tmp_path / "older.pkl")
    generator, _ = load_official(tmp_path / "older.pkl", "tiny")
    assert not generator.unet.down_blocks[0].downsamplers[0].conv.lora_B["default"].weight.any()
    del state["state_dict_unet"]["up_blocks.0.resnets.0.conv1.lora_B.default.weight"]  # half a pair is damage
    torch.save(state, tmp_path / "damaged.pkl")
    with pytest.raises(BadInputError, match="lacks 1 trained tensors"):
        load_official(tmp_path / "damaged.pkl", "tiny")


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_code_are_refused(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"rank_unet": Exploit()}, f)
    with pytest.raises(BadInputError, match="weights_only"):
        load_official(tmp_path / "evil.pkl", "tiny")


def test_not_an_official_checkpoint_is_named(tmp_path):
    torch.save({"state_dict_unet": {}}, tmp_path / "partial.pkl")
    with pytest.raises(BadInputError, match="rank_unet"):
        load_official(tmp_path / "partial.pkl", "tiny")
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")  # one of our own models' files
    with pytest.raises(BadInputError, match="needs no converting; pass its folder as the model"):
        load_official(tmp_path / "model.safetensors", "tiny")


def test_convert_official_to_our_format(tmp_path):
    unet, vae = _tiny_parts()
    torch.save(official_unpaired(unet, vae), tmp_path / "official.pkl")
    out = convert_official(tmp_path / "official.pkl", tmp_path / "ours", "tiny", prompts={"a2b": "night"})
    ours, backbone = load_pretrained(out)
    theirs, _ = load_official(tmp_path / "official.pkl", "tiny")
    assert ours.config.prompts == {"a2b": "night"}
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours(x, embed(backbone), "b2a"), theirs(x, embed(backbone), "b2a"))
    with pytest.raises(BadInputError, match="already exists"):
        convert_official(tmp_path / "official.pkl", out, "tiny")


def test_an_official_file_loaded_by_path_keeps_its_named_models_defaults(tmp_path):
    """A hand-downloaded official file under its published name gets what its named model adds to it (the file does
    not carry them): the sketch model's r = 0.4 and sketch input; under another name, nothing is guessed."""
    from turbo_i2i.registry import MODELS, load_model

    unet, vae = _tiny_parts()
    state = official_paired(unet, vae, stochastic=True)
    torch.save(state, tmp_path / MODELS["sketch_to_image_stochastic"].file)
    torch.save(state, tmp_path / "renamed.pkl")
    named, _ = load_model(tmp_path / MODELS["sketch_to_image_stochastic"].file, base_model="tiny")
    assert named.config.default_r == 0.4 and named.config.preprocess == "sketch"
    renamed, _ = load_model(tmp_path / "renamed.pkl", base_model="tiny")
    assert renamed.config.default_r is None and renamed.config.preprocess is None


def test_saved_weights_are_as_readable_as_any_new_file(tmp_path):
    """safetensors creates its files readable by their owner only: an exported model gets the usual permissions."""
    import stat

    generator, backbone = make_generator(train_all=True)
    folder = save_pretrained(generator, tmp_path / "m", text_encoder=backbone.text_encoder)
    (tmp_path / "plain.txt").write_text("x")
    usual = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    for name in (WEIGHTS_NAME, "text_encoder.safetensors"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == usual, name
