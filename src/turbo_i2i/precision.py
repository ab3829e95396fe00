"""Which floating-point precisions a device computes natively, and a warning where a half precision is emulated.

A CPU without bf16 instructions (AVX-512 BF16 or AMX) still runs bf16 models, through conversions to fp32 and generic
kernels: the fast path took 4.3x as long as the plain fp32 baseline on a 2-core AVX2 CPU (README, Performance). The
user asked for bf16 to go faster and gets the opposite, so they are told.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("turbo_i2i")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN kernels with native arithmetic for the half precision ``dtype``."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def computes_natively(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes in ``dtype`` with its own arithmetic rather than by conversion to fp32.

    Args:
        device: where the model runs.
        dtype: the precision it runs in.

    Returns:
        True for fp32 everywhere, for bf16 on GPUs that support it and for fp16 on any GPU, and for half precisions on
        CPUs with the matching instructions; True on other devices, which this project has not measured.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return True
    if device.type == "cpu":
        return _cpu_computes_natively(dtype)
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported()
    return True


def warn_if_emulated(device: torch.device, dtype: torch.dtype | None, setting: str) -> bool:
    """Log a warning when ``dtype`` is emulated on ``device``.

    Args:
        device: where the model runs.
        dtype: the precision asked for (None: the model's own fp32).
        setting: the option that asked for it, named in the message (e.g. "--dtype bfloat16").

    Returns:
        whether it warned.
    """
    if dtype is None or computes_natively(device, dtype):
        return False
    logger.warning(
        "%s: this %s has no native %s arithmetic, so it is emulated: slower than float32, not faster. Use float32"
        " here.",
        setting, device.type.upper(), dtype_name(dtype),
    )  # fmt: skip
    return True
