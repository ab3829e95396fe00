"""The compute settings a caller names, checked before anything is loaded: a GPU this machine does not have, a dtype
or a batch size given as something else, is named in our message instead of a PyTorch or Python traceback."""

from __future__ import annotations

import numbers

import torch

from .errors import BadInputError


def check_device(device: torch.device | str | None) -> torch.device | None:
    """A device this machine has.

    Args:
        device: a torch device or its name ("cpu", "cuda", "cuda:1", "mps"); None: the caller's default.

    Returns:
        the ``torch.device`` (None for None).

    Raises:
        BadInputError: not a device name, or an index this machine's GPUs do not reach.
    """
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        raise BadInputError(f"{device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from error
    available = {
        "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": int(torch.backends.mps.is_available()),
    }
    if device.type in available and (device.index or 0) >= available[device.type]:
        raise BadInputError(
            f"{str(device)!r}: this machine has {available[device.type] or 'no'} {device.type} device(s)."
        )
    return device


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating-point torch dtype, also from its name ("bfloat16", "torch.float16").

    Args:
        dtype: the dtype or its name.

    Returns:
        the ``torch.dtype``.

    Raises:
        BadInputError: not a floating-point dtype.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInputError(f"dtype must be a floating-point torch dtype such as torch.bfloat16, got {dtype!r}.")
    return dtype


def check_batch_size(batch_size: object) -> None:
    """Refuse a batch size that is not a whole number of at least 1.

    Args:
        batch_size: images per forward pass.

    Raises:
        BadInputError: naming the value.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise BadInputError(f"batch_size must be a whole number, at least 1, got {batch_size!r}.")
