"""Build checkpoints in the official img2img-turbo layout the way the released code wrote them (on plain diffusers
modules with peft), with tiny or full-size shapes. Key names follow ../shared/reference/official-checkpoint-format.md.
"""

import copy

import torch
from peft import LoraConfig, get_peft_model_state_dict
from torch import nn

from turbo_i2i.adapters import UNET_LORA_TARGETS, VAE_LORA_TARGETS, unpaired_unet_targets
from turbo_i2i.generator import skip_channels


class OfficialTwinConv(nn.Module):
    def __init__(self, pretrained, curr):
        super().__init__()
        self.conv_in_pretrained = copy.deepcopy(pretrained)
        self.conv_in_curr = copy.deepcopy(curr)


def _add_skip_convs(vae):
    for k, (c_in, c_out) in enumerate(skip_channels(list(vae.config.block_out_channels)), start=1):
        setattr(vae.decoder, f"skip_conv_{k}", nn.Conv2d(c_in, c_out, 1, bias=False))


def _fill(module, seed):
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # the unpaired files do not store the base conv_in (it stays SD-Turbo's), so leave it as it is
            if "lora" in name or "skip" in name or ("conv_in" in name and "base_layer" not in name):
                if p.device.type != "meta":
                    p.copy_(torch.randn(p.shape, generator=rng) * 0.05)


def official_paired(unet, vae, stochastic=False, rank_unet=8, rank_vae=4, seed=0):
    """The dict pix2pix-Turbo's save_model writes (unet/vae are consumed)."""
    if stochastic:
        unet.conv_in = OfficialTwinConv(unet.conv_in, unet.conv_in)
    _add_skip_convs(vae)
    vae.add_adapter(
        LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=list(VAE_LORA_TARGETS)),
        adapter_name="vae_skip",
    )
    unet.add_adapter(LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=list(UNET_LORA_TARGETS)))
    _fill(unet, seed)
    _fill(vae, seed + 1)
    return {
        "unet_lora_target_modules": list(UNET_LORA_TARGETS),
        "vae_lora_target_modules": list(VAE_LORA_TARGETS),
        "rank_unet": rank_unet,
        "rank_vae": rank_vae,
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k or "skip" in k},
    }


def official_unpaired(unet, vae, rank_unet=8, rank_vae=4, seed=0):
    """The dict CycleGAN-Turbo's save_ckpt writes: three UNet adapters, two whole VAEs (a2b "vae", b2a "vae_b2a")."""
    targets = unpaired_unet_targets(unet)
    for adapter, modules in targets.items():
        config = LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=modules, lora_alpha=rank_unet)
        unet.add_adapter(config, adapter_name=adapter)
    unet.set_adapters(list(targets))
    _add_skip_convs(vae)
    vae.add_adapter(
        LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=list(VAE_LORA_TARGETS)),
        adapter_name="vae_skip",
    )
    vae_b2a = copy.deepcopy(vae)
    _fill(unet, seed)
    _fill(vae, seed + 1)
    _fill(vae_b2a, seed + 2)
    vaes = nn.ModuleDict({"vae": vae, "vae_b2a": vae_b2a})
    state = {
        "l_target_modules_encoder": targets["default_encoder"],
        "l_target_modules_decoder": targets["default_decoder"],
        "l_modules_others": targets["default_others"],
        "rank_unet": rank_unet,
        "rank_vae": rank_vae,
        "vae_lora_target_modules": list(VAE_LORA_TARGETS),
        "sd_vae_enc": vaes.state_dict(),
        "sd_vae_dec": vaes.state_dict(),
    }
    for key, adapter in zip(("sd_encoder", "sd_decoder", "sd_other"), targets):
        state[key] = get_peft_model_state_dict(unet, adapter_name=adapter)
    return state
