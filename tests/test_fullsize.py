"""Full-size SD-Turbo architecture (configs from ../shared/reference, weights on the meta device: no memory, no
download): official-format checkpoints of the real size map onto our generator with no missing or unexpected key."""

from pathlib import Path

import pytest
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from official_format import official_paired, official_unpaired

from turbo_i2i.backbone import OneStepSchedule
from turbo_i2i.checkpoints import absent_lora_pairs, fit_base_layer_names, official_to_ours
from turbo_i2i.generator import OneStepGenerator

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "sd-turbo-architecture"

pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"{REFERENCE} not present")


def full_size_parts():
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(REFERENCE / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(REFERENCE / "vae"))
    return unet, vae


def check_import(state):
    config, tensors, from_backbone = official_to_ours(state, "stabilityai/sd-turbo")
    unet, vae = full_size_parts()
    with init_empty_weights():
        generator = OneStepGenerator(config, unet, vae, OneStepSchedule.from_config({}))
    names = {n for n, _ in generator.named_parameters()}
    tensors = fit_base_layer_names(tensors, names)
    generator.check_trained_state_dict(tensors, allow_missing=from_backbone | absent_lora_pairs(tensors, names))
    return generator, tensors


@pytest.mark.parametrize("stochastic,rank_unet", [(False, 8), (True, 128)])
def test_full_size_official_paired_checkpoint_fits(stochastic, rank_unet):
    with init_empty_weights():
        state = official_paired(*full_size_parts(), stochastic=stochastic, rank_unet=rank_unet)
    if not stochastic:
        # The released edge_to_image file has 514 keys; today's diffusers SD 2.1 UNet gives one more LoRA'd module in
        # the down blocks (2 keys) by the same suffix rule. A file without that module still imports (see below).
        assert len(state["state_dict_unet"]) == 514 + 2
    assert len(state["state_dict_vae"]) == 152
    generator, tensors = check_import(state)
    skip = generator.vae["a2b"].decoder
    assert tuple(skip.skip_conv_1.base_layer.weight.shape) == (512, 512, 1, 1)
    assert tuple(skip.skip_conv_4.base_layer.weight.shape) == (256, 128, 1, 1)


def test_full_size_official_unpaired_checkpoint_fits():
    with init_empty_weights():
        state = official_unpaired(*full_size_parts(), rank_unet=128)
    # the released files: 93 / 147 / 17 modules; today's diffusers adds one down-block module (see the paired test)
    lists = ("l_target_modules_encoder", "l_target_modules_decoder", "l_modules_others")
    assert [len(state[k]) for k in lists] == [93 + 1, 147, 17]
    assert [len(state[k]) for k in ("sd_encoder", "sd_decoder", "sd_other")] == [186 + 2, 294, 34]
    assert len(state["sd_vae_enc"]) == 800
    check_import(state)
