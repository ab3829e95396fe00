"""Convolution and linear weights kept in oneDNN's blocked layout for bf16 inference on the CPU.

A bf16 convolution or linear layer on the CPU first reorders its weight into the blocked layout that oneDNN's AMX and
AVX-512 kernels read, on every call. A ``Translator``'s weights do not change between calls, so that work can be done
once: ``prepack_weights`` swaps each plain ``nn.Conv2d`` and ``nn.Linear`` for a subclass that shares its parameters
(names, state dict and values unchanged) and keeps the reordered copy (a ``DerivedWeights``, dropped when the weight
changes). The copy is used where it applies: bf16 on the CPU, no autograd, not inside ``torch.compile`` (inductor packs
weights itself); everywhere else the layer runs as before. An upsampler whose convolution is packed packs its
sub-pixel kernels too (``subpixel.py``). The convolutions give the same numbers as unpacked ones (tested; linear layers
round differently at bf16's last bit); the copies take about as much memory as the bf16 weights. README, Performance,
has what it saves (``benchmarks/weight_caches.py``).

``torch.ops.mkldnn._reorder_convolution_weight`` and ``_convolution_pointwise`` (and the linear pair) are the ops
inductor's CPU backend runs for the same purpose; they are internal to torch, which this project pins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .derived import DerivedWeights, clear_derived_weights
from .precision import computes_natively


def packable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a layer's call on ``x`` can use a packed copy of ``weight``.

    Args:
        x: the layer's input.
        weight: its weight.
        bias: its bias.

    Returns:
        True for bf16 input, weight and bias on a CPU with native bf16 kernels, outside autograd and compilation.
    """
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and (bias is None or bias.dtype == weight.dtype)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and computes_natively(x.device, x.dtype)
    )


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: DerivedWeights | None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d``, with the weight's packed copy from ``packed`` where ``packable``.

    Args:
        x: (N, C, H, W) input.
        weight, bias, stride, padding, dilation, groups: as ``F.conv2d`` takes them (padding as numbers).
        packed: where the packed copy of ``weight`` is kept between calls; None: never pack.

    Returns:
        the convolution's output.
    """
    if packed is None or not packable(x, weight, bias):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    args = (list(padding), list(stride), list(dilation), groups)
    w = packed.get(weight, lambda: torch.ops.mkldnn._reorder_convolution_weight(weight, *args, list(x.shape)))
    return torch.ops.mkldnn._convolution_pointwise(x, w, bias, *args, "none", [], "")


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that keeps its weight packed for bf16 CPU inference (zero padding given as numbers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: DerivedWeights[torch.Tensor] = DerivedWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self._packed, self.stride, self.padding, self.dilation, self.groups)


class PackedLinear(nn.Linear):
    """``nn.Linear`` that keeps its weight packed for bf16 CPU inference."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: DerivedWeights[torch.Tensor] = DerivedWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not packable(x, self.weight, self.bias):
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        w = self._packed.get(self.weight, lambda: torch.ops.mkldnn._reorder_linear_weight(self.weight, rows))
        return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")


def _twin(module: nn.Module, packed: bool) -> nn.Module | None:
    """``module``'s packed (or, for a packed one, plain) twin sharing its parameters; None where there is none."""
    convs, linears = (nn.Conv2d, PackedConv2d), (nn.Linear, PackedLinear)
    if type(module) is convs[not packed] and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        twin = convs[packed](
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, bias=module.bias is not None, device="meta",
        )  # fmt: skip
    elif type(module) is linears[not packed]:
        twin = linears[packed](module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    else:
        return None
    twin.weight, twin.bias = module.weight, module.bias
    return twin.train(module.training)


def _swap(model: nn.Module, packed: bool) -> int:
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            twin = _twin(child, packed)
            if twin is not None:
                setattr(parent, name, twin)
                swapped += 1
    clear_derived_weights(model)  # values kept for the old layers (the sub-pixel kernels' packed copies, say)
    return swapped


def prepack_weights(model: nn.Module) -> int:
    """Swap every plain ``nn.Conv2d`` and ``nn.Linear`` of ``model`` for its packed twin, in place.

    peft's LoRA layers keep working: their base layer is swapped, and merging writes into the shared weights (the
    generator clears the packed copies when it merges or unmerges, ``derived.clear_derived_weights``).

    Args:
        model: the model (its parameter names and values stay the same).

    Returns:
        how many layers were swapped.
    """
    return _swap(model, packed=True)


def unpack_weights(model: nn.Module) -> int:
    """Undo ``prepack_weights``: plain layers again, sharing the same parameters; the packed copies are freed.

    Args:
        model: the model.

    Returns:
        how many layers were swapped back.
    """
    return _swap(model, packed=False)
