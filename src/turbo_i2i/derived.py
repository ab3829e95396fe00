"""Values computed from a module's weights (the sub-pixel upsamplers' kernels), kept until the weights change.

Inference calls a model with the same weights over and over, so what is derived from them need not be recomputed on
every call: the sub-pixel kernels of the UNet's and VAE's six upsamplers cost more per call than some of its
convolutions (README, Performance). A cached value is keyed on the weight's storage, version counter, dtype, device
and shape, which ``.to()``, optimizer steps and ``load_state_dict`` all change. peft's merge and unmerge write
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

    def get(self, weight: torch.Tensor, compute: Callable[[], T], *extra: Hashable) -> T:
        """The value for ``weight`` as it is now.

        Args:
            weight: the tensor the value is computed from.
            compute: computes the value (called only when the key changed).
            extra: further parts of the key (e.g. the memory layout the value is laid out in).

        Returns:
            the cached or freshly computed value.
        """
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape), *extra)
        if key != self._key:
            self._value = None  # free the old value before computing the new one
            self._value = compute()
            self._key = key
        return self._value

    def clear(self) -> None:
        """Forget the value (its weight was changed in a way the key cannot see)."""
        self._key = self._value = None


def clear_derived_weights(model: nn.Module) -> None:
    """Forget every value derived from ``model``'s weights: call after changing ``weight.data`` in place.

    Args:
        model: the model whose modules hold ``DerivedWeights``.
    """
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, DerivedWeights):
                value.clear()
