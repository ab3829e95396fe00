"""LoRA on the backbone, only through peft: target modules, attaching named adapters, and per-call LoRA scales.

The recipes follow the paper's released code so that official checkpoints map onto our modules key for key:

- paired (pix2pix-Turbo): one UNet adapter ``default`` whose targets are module-name *suffixes* (peft matches a
  short name ``conv`` against ``...downsamplers.0.conv`` but not against ``conv_in``, which is retrained in full);
- unpaired (CycleGAN-Turbo): three UNet adapters with explicit full module names, split into the down blocks
  + ``conv_in`` (``default_encoder``), the up blocks (``default_decoder``) and the rest (``default_others``);
- the VAE: one adapter ``vae_skip`` per direction, including the skip convs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

UNET_LORA_TARGETS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip
# The unpaired recipe matches these as *substrings* of parameter names (so "conv" also picks ``conv_in``).
UNPAIRED_UNET_PATTERNS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
    "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip
VAE_LORA_TARGETS = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
    "skip_conv_1", "skip_conv_2", "skip_conv_3", "skip_conv_4", "to_k", "to_q", "to_v", "to_out.0",
)  # fmt: skip
UNET_ADAPTER = "default"
UNPAIRED_UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "vae_skip"


def unpaired_unet_targets(unet: nn.Module, patterns: Iterable[str] = UNPAIRED_UNET_PATTERNS) -> dict[str, list[str]]:
    """Split the UNet's LoRA targets into the three adapters of the unpaired recipe.

    Args:
        unet: the UNet (before any adapter is attached).
        patterns: substrings that select a weight for LoRA (biases and norms never are).

    Returns:
        adapter name -> full module names, in parameter order.
    """
    encoder, decoder, others = UNPAIRED_UNET_ADAPTERS
    targets: dict[str, list[str]] = {encoder: [], decoder: [], others: []}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(p in name for p in patterns):
            continue
        module = name.removesuffix(".weight")
        if "down_blocks" in name or "conv_in" in name:
            targets[encoder].append(module)
        elif "up_blocks" in name:
            targets[decoder].append(module)
        else:
            targets[others].append(module)
    return targets


def attach_lora(module: nn.Module, adapter_name: str, targets: Iterable[str], rank: int, alpha: float) -> None:
    """Inject a named LoRA adapter (gaussian A, zero B: the module's output is unchanged until trained).

    Args:
        module: the model to adapt, in place.
        adapter_name: peft adapter name (part of every LoRA parameter name).
        targets: module-name suffixes or full names, matched by peft's rule.
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / r.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with warnings.catch_warnings():
        # Several named adapters on one model is the point of the unpaired recipe, not a mistake.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)


def activate_adapters(module: nn.Module, adapter_names: list[str]) -> None:
    """Make several adapters active together (injecting an adapter makes it the only active one in every layer).

    Args:
        module: the model.
        adapter_names: adapters that all take part in the forward pass (a layer ignores names it does not hold).
    """
    for layer in lora_layers(module):
        layer.set_adapter(adapter_names)  # also sets requires_grad; the generator sets trainability afterwards


def lora_layers(module: nn.Module) -> Iterator[LoraLayer]:
    """Every peft LoRA layer inside ``module``."""
    return (m for m in module.modules() if isinstance(m, LoraLayer))


@contextmanager
def lora_scale(modules: Iterable[nn.Module], scale: float) -> Iterator[None]:
    """Scale every LoRA update by ``scale`` for the duration of one call, then restore the trained scale exactly.

    The stochastic model sets its LoRA strength to r on each call; restoring in ``finally`` keeps no per-call
    state on the modules, so a later call with another r is never affected by this one.

    Args:
        modules: models whose LoRA layers are scaled.
        scale: factor on alpha / r (1.0 leaves the model unchanged).
    """
    layers = [layer for m in modules for layer in lora_layers(m)]
    try:
        for layer in layers:
            for adapter in layer.scaling:
                layer.set_scale(adapter, scale)
        yield
    finally:
        for layer in layers:
            for adapter in layer.scaling:
                layer.set_scale(adapter, 1.0)


def merge_lora(modules: Iterable[nn.Module], scale: float = 1.0) -> None:
    """Fold every active LoRA update, times ``scale``, into its base weight (inference runs one conv per layer).

    Args:
        modules: models whose LoRA layers are merged, in place.
        scale: factor on alpha / r that the merged weights carry (the stochastic model's r).
    """
    for layer in (layer for m in modules for layer in lora_layers(m)):
        for adapter in layer.scaling:
            layer.set_scale(adapter, scale)
        layer.merge()
        for adapter in layer.scaling:
            layer.set_scale(adapter, 1.0)


def unmerge_lora(modules: Iterable[nn.Module], scale: float = 1.0) -> None:
    """Undo ``merge_lora(modules, scale)``: subtract the same updates again (exact up to float rounding).

    Args:
        modules: models merged with ``merge_lora``.
        scale: the scale they were merged with.
    """
    for layer in (layer for m in modules for layer in lora_layers(m)):
        if not layer.merged:
            continue
        for adapter in layer.scaling:  # peft subtracts the update at the *current* scale
            layer.set_scale(adapter, scale)
        layer.unmerge()
        for adapter in layer.scaling:
            layer.set_scale(adapter, 1.0)
