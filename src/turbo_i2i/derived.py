"""Values computed from a module's weights (the sub-pixel upsamplers' kernels), kept until the weights change.

Inference calls a model with the same weights over and over, so what is derived from them need not be recomputed on
every call: the sub-pixel kernels of the UNet's and VAE's six upsamplers cost more per call than some of its
convolutions (README, Performance). A cached value is keyed on the weight's storage (held, so a replacing weight cannot
take its address), version counter, dtype, device and shape, which ``.to()``, optimizer steps, ``load_state_dict``
and ``param.data = ...`` all change. peft's merge and unmerge write
``weight.data`` in place, which no version counter sees, so whoever merges calls ``clear_derived_weights``
(``OneStepGenerator.merge_lora`` and ``unmerge_lora`` do).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class DerivedWeights(Generic[T]):
    """One value computed from a weight, recomputed when the weight (or an extra part of the key) changes."""

    def __init__(self):
        self._key: tuple | None = None
        self._value: T | None = None
        self._source: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, compute: Callable[[], T], *extra: Hashable) -> T:
        """The value for ``weight`` as it is now.

        Args:
            weight: the tensor the value is computed from.
            compute: computes the value (called only when the key changed).
            extra: further parts of the key (e.g. the memory layout the value is laid out in).

        Returns:
            the cached or freshly computed value.
        """
        # Inference mode is part of the key: a value made there cannot be saved for a backward pass outside it.
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape),
               torch.is_inference_mode_enabled(), *extra)  # fmt: skip
        if key != self._key:
            self._value = None  # free the old value before computing the new one
            self._value = compute()
            self._key = key
            # Holding the weight's storage keeps its address from being reused by a weight that replaces it
            # (``param.data = new`` keeps the version counter): a new weight always gets a new key.
            self._source = weight.detach()
        return self._value

    def clear(self) -> None:
        """Forget the value (its weight was changed in a way the key cannot see)."""
        self._key = self._value = self._source = None


def clear_derived_weights(model: nn.Module) -> None:
    """Forget every value derived from ``model``'s weights: call after changing ``weight.data`` in place.

    Args:
        model: the model whose modules hold ``DerivedWeights``.
    """
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, DerivedWeights):
                value.clear()
