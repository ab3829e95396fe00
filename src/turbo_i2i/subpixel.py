"""Nearest-neighbour 2x upsampling + 3x3 convolution, computed on the low-resolution input.

Every decoder upsampler of SD-Turbo (diffusers' ``Upsample2D``) doubles the image by repeating pixels and then runs a
3x3 convolution on the doubled image. Output pixel (2i + a, 2j + b) only sees low-resolution pixels i - 1 .. i + 1
(rows) and j - 1 .. j + 1 (columns), and of those only two in each direction, so each of the four phases (a, b) is a
2x2 convolution of the *low-resolution* input whose weights are sums of the 3x3 kernel's entries:

    phase 0 rows: (w[0], w[1] + w[2]) over rows (i - 1, i);   phase 1 rows: (w[0] + w[1], w[2]) over rows (i, i + 1)

and the same for columns. The result is the same function (exact in real arithmetic; float rounding differs) with 4/9
of the multiply-adds. In the VAE decoder's three upsamplers, on this project's CPU in bf16 at 512 px, that measured
0.90 s against 1.74 s.

It is differentiable, so training uses it too, in the VAE decoders: the backward pass also runs on the low-resolution
input, and what is kept for it is the padded input instead of the 4x larger upsampled one (the four kernels are kept
too, which is why the trainers leave the UNet's upsamplers, whose weights outweigh their activations, as they are).
With LoRA, the update is added to the weight (peft's ``get_delta_weight``), so the weight gradient is one small-kernel
convolution and A and B get theirs through the sum.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from peft.tuners.lora import LoraLayer
from torch import nn

from .derived import DerivedWeights


def phase_kernels(weight: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """The four 2x2 kernels that replace a 3x3 kernel applied after nearest-neighbour 2x upsampling.

    Args:
        weight: a (C_out, C_in, 3, 3) convolution weight; half-precision sums are taken in float32 and rounded once.

    Returns:
        (row phase, column phase) -> (C_out, C_in, 2, 2) kernel, for output pixels (2i + a, 2j + b).
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    rows = {0: (w[:, :, 0], w[:, :, 1] + w[:, :, 2]), 1: (w[:, :, 0] + w[:, :, 1], w[:, :, 2])}
    kernels = {}
    for a, (top, bottom) in rows.items():
        r = torch.stack((top, bottom), dim=2)  # (C_out, C_in, 2, 3)
        cols = {0: (r[..., 0], r[..., 1] + r[..., 2]), 1: (r[..., 0] + r[..., 1], r[..., 2])}
        for b, (left, right) in cols.items():
            kernels[a, b] = torch.stack((left, right), dim=-1).to(weight.dtype)
    return kernels


def _effective_weight(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The (weight, bias) ``conv`` applies, LoRA updates included; None where that is not a plain sum."""
    if not isinstance(conv, LoraLayer):
        return conv.weight, conv.bias
    base = conv.get_base_layer()
    if conv.merged or conv.disable_adapters:
        return base.weight, base.bias
    active = [a for a in conv.active_adapters if a in conv.lora_A]
    if any(a in conv.lora_variant for a in active):  # DoRA and other variants are not a weight sum
        return None
    if conv.training and any(not isinstance(conv.lora_dropout[a], nn.Identity) for a in active):
        return None  # dropout acts on the adapter's input, which a summed weight never sees
    weight = base.weight
    for adapter in active:  # peft's own delta (B @ A at the current scale): what merging would add
        weight = weight + conv.get_delta_weight(adapter).to(weight.dtype)
    return weight, base.bias


class SubPixelUpsample(nn.Module):
    """``Upsample2D`` (nearest 2x, then a 3x3 convolution) as four 2x2 convolutions on the low-resolution input.

    Holds the upsampler's convolution under the same attribute name (``conv``), so parameter names do not change.
    Other output sizes (the UNet's odd-size case), LoRA variants and LoRA dropout in training run the plain
    upsample-then-convolve.

    Args:
        conv: the upsampler's 3x3, stride 1, padding 1 convolution (a plain ``nn.Conv2d`` or a peft LoRA layer).
    """

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        self._kernels: DerivedWeights[dict[tuple[int, int], torch.Tensor]] = DerivedWeights()

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None, *args, **kwargs):
        """Same call as ``Upsample2D.forward`` (which also ignores further arguments).

        Args:
            hidden_states: (N, C, H, W).
            output_size: the target (H', W'); default 2H x 2W.

        Returns:
            (N, C_out, H', W').
        """
        n, _, h, w = hidden_states.shape
        effective = _effective_weight(self.conv)
        if effective is None or (output_size is not None and tuple(output_size) != (2 * h, 2 * w)):
            size = {"scale_factor": 2.0} if output_size is None else {"size": output_size}
            return self.conv(F.interpolate(hidden_states, mode="nearest", **size))
        weight, bias = effective
        padded = F.pad(hidden_states, (1, 1, 1, 1))
        nhwc = hidden_states.is_contiguous(memory_format=torch.channels_last) and not hidden_states.is_contiguous()
        layout = torch.channels_last if nhwc else torch.contiguous_format
        out = torch.empty(
            (n, weight.shape[0], 2 * h, 2 * w), dtype=hidden_states.dtype, device=hidden_states.device,
            memory_format=layout,
        )  # fmt: skip
        for (a, b), kernel in self._phase_kernels(weight, layout).items():
            # output row 2i + a reads low-resolution rows i + a - 1 and i + a: padded rows i + a and i + a + 1
            out[:, :, a::2, b::2] = F.conv2d(padded[:, :, a : a + h + 1, b : b + w + 1], kernel, bias)
        return out

    def _phase_kernels(self, weight: torch.Tensor, layout: torch.memory_format) -> dict[tuple[int, int], torch.Tensor]:
        """The four kernels of ``weight`` in ``layout``; kept between calls while the weight is the unchanged base.

        A merged or LoRA-free upsampler's kernels are reused (computing them took longer than the convolutions of
        the UNet's 1280-channel upsamplers); a LoRA sum made for this call, a weight autograd must see, and a compiled
        graph (which cannot trace a cache) get fresh ones.
        """

        def compute() -> dict[tuple[int, int], torch.Tensor]:
            # oneDNN picks NHWC only when the weight is NHWC too
            return {phase: k.contiguous(memory_format=layout) for phase, k in phase_kernels(weight).items()}

        base = self.conv.get_base_layer() if isinstance(self.conv, LoraLayer) else self.conv
        fresh = weight is not base.weight or (torch.is_grad_enabled() and weight.requires_grad)
        if fresh or torch.compiler.is_compiling():
            return compute()
        return self._kernels.get(weight, compute, layout)


class Swap(NamedTuple):
    """One replaced upsampler: ``parent.<name>`` was ``original``."""

    parent: nn.Module
    name: str
    original: Upsample2D


def use_subpixel_upsampling(model: nn.Module) -> list[Swap]:
    """Replace every ``Upsample2D`` of ``model`` that is nearest 2x + 3x3 convolution by a ``SubPixelUpsample``.

    Args:
        model: a UNet, VAE or generator (changed in place; parameter names and values stay the same).

    Returns:
        the replacements, for ``restore_upsamplers``.
    """
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Upsample2D) and _is_nearest_3x3(child):
                setattr(parent, name, SubPixelUpsample(child.conv))
                swaps.append(Swap(parent, name, child))
    return swaps


def restore_upsamplers(swaps: list[Swap]) -> None:
    """Put back the upsamplers ``use_subpixel_upsampling`` replaced (they share the same conv modules)."""
    for parent, name, original in swaps:
        setattr(parent, name, original)


def _is_nearest_3x3(upsample: Upsample2D) -> bool:
    if not (upsample.use_conv and upsample.interpolate and upsample.name == "conv") or upsample.norm is not None:
        return False  # no conv, no interpolation, a norm first, or the conv under its other name (Conv2d_0)
    conv = upsample.conv.get_base_layer() if isinstance(upsample.conv, LoraLayer) else upsample.conv
    return (
        isinstance(conv, nn.Conv2d)  # not a ConvTranspose2d (use_conv_transpose), which replaces the interpolation
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )
