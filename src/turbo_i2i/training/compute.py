"""How training computes: mixed precision (what is stored and run in bf16 / fp16, the loss scaler), the memory layout
and the attention kernel, chosen per device. The trainers call these once, when they build their models.
"""

from __future__ import annotations

import dataclasses

import torch

from ..precision import computes_natively, warn_if_emulated

HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen (``requires_grad=False``) parameters of ``module`` in ``dtype``; trainable ones stay fp32.

    True mixed precision: the frozen backbone is only ever read under autocast, so keeping it in bf16 halves its
    memory and spares autocast a cast per use (the casts of frozen weights are also kept alive for the backward pass
    of every generator pass). Parameters shared between modules (the unpaired model's frozen VAE) are cast once.

    Args:
        module: the model, changed in place.
        dtype: the storage dtype of its frozen parameters, e.g. ``torch.bfloat16``.
    """
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def loss_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    """The gradient scaler of a run: enabled under fp16, whose narrow range needs loss scaling (bf16 has fp32's range
    and does not); disabled, its calls pass values through unchanged.

    Args:
        device: where the run trains.
        mixed_precision: the run's resolved ``mixed_precision``.

    Returns:
        a ``torch.amp.GradScaler``.
    """
    return torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")


def resolve_mixed_precision(config, device: torch.device):
    """The run config with ``mixed_precision="auto"`` replaced by what it means on ``device``.

    "auto" is bf16 where the device computes bf16 natively (GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX) and
    "no" (fp32) elsewhere: on a 2-core AVX2 CPU the demo preset's step took 19.6 s in emulated bf16 against 2.3 s in
    fp32 (README, the built-in model). Explicit values are kept as given, with a warning where the device only
    emulates them.

    Args:
        config: a ``TrainConfig``.
        device: where the run trains.

    Returns:
        ``config`` itself, or a copy with the resolved ``mixed_precision``.
    """
    if config.mixed_precision != "auto":
        half = HALF_PRECISION.get(config.mixed_precision)
        warn_if_emulated(device, half, f"--mixed-precision {config.mixed_precision}")
        return config
    native = computes_natively(device, torch.bfloat16)
    return dataclasses.replace(config, mixed_precision="bf16" if native else "no")


def channels_last_in_training(device: torch.device, mixed_precision: str) -> bool:
    """Whether the trainers keep the generator in channels-last (NHWC) memory.

    On the CPU in half precision, oneDNN's convolutions are faster in NHWC, backward pass included: the full-size VAE
    encoder and decoder, 256 px, forward and backward under bf16 autocast, took 4.9 s against 5.9 s on this project's
    CPU. Not on a GPU, where inference uses it (``pipeline.channels_last_is_faster``): tried in unpaired training on an
    H100 together with cuDNN's autotuner, it made the first steps far slower (README); alone (unpaired, 512 px, bf16,
    H100, ``benchmarks/train_unpaired.py`` case ``ours-bf16-nhwc``) it took 2.38 s per iteration against 2.29 in NCHW,
    and 0.3 GiB more memory.

    Args:
        device: where the generator trains.
        mixed_precision: the run's ``mixed_precision`` ("no", "bf16" or "fp16").

    Returns:
        True where the generator should be converted with ``.to(memory_format=torch.channels_last)``.
    """
    return device.type == "cpu" and mixed_precision in HALF_PRECISION


class HalfPrecisionGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm that keeps a bf16 / fp16 input in that dtype under autocast (the statistics are still accumulated
    in fp32 by the kernel).

    CUDA's autocast runs ``group_norm`` in fp32 (the CPU's does not). Each norm of the VAE and UNet then saves an fp32
    copy of its full-size input, the SiLU after it saves its fp32 output, and the next convolution casts that back to
    half precision. Here the norm's output is rounded to half precision once, as the next convolution would have
    rounded it anyway. Measured on an H100 (README, unpaired training at 512 px): bf16 peak memory 26.6 -> 20.7 GiB.
    On the CPU it is the plain GroupNorm: its kernel already takes a half-precision input with the fp32 weights and
    returns half precision, so training there gives the same numbers with and without the replacement.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in HALF_PRECISION.values() or x.device.type == "cpu":
            return super().forward(x)
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.group_norm(x, self.num_groups, weight, bias, self.eps)


def keep_norms_in_half_precision(module: torch.nn.Module) -> None:
    """Replace every ``torch.nn.GroupNorm`` in ``module`` with a :class:`HalfPrecisionGroupNorm` on the same
    parameter objects, so weights shared between directions (the unpaired model's frozen VAE) stay shared; a norm
    module reachable from two parents is replaced by one module.

    Args:
        module: the model, changed in place (its state dict keys and values do not change).
    """
    replacements: dict[int, HalfPrecisionGroupNorm] = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.GroupNorm:
                continue
            if id(child) not in replacements:
                norm = HalfPrecisionGroupNorm(child.num_groups, child.num_channels, child.eps, affine=False)
                norm.affine, norm.weight, norm.bias = child.affine, child.weight, child.bias
                norm.train(child.training)
                replacements[id(child)] = norm
            setattr(parent, name, replacements[id(child)])


def keep_lora_inputs_in_half_precision(module: torch.nn.Module) -> None:
    """Stop peft casting each LoRA layer's input to its adapter weights' dtype (``cast_input_dtype_enabled``).

    Under mixed precision the adapters stay fp32 while activations are bf16 / fp16: peft then copies every LoRA
    layer's full-size input up to fp32 before ``lora_A``, which autocast at once copies back down to half precision
    for the matrix product; the backward pass does the same to the gradient. The result is bit for bit the same
    without the two copies (on the unpaired tiny model: 128 activation up-casts and 128 down-casts per generator
    forward pass fewer, ``tests/test_half_norms.py``).

    Args:
        module: the model holding peft LoRA layers; changed in place. Only run it under autocast afterwards (the
            trainers do): outside it, a half-precision input would meet the fp32 adapter weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for child in module.modules():
        if isinstance(child, BaseTunerLayer):
            child.cast_input_dtype_enabled = False


def train_in_half_precision(generator: torch.nn.Module, dtype: torch.dtype) -> None:
    """Prepare a generator for training under ``dtype`` autocast with fp32 trainable weights (both trainers).

    Its frozen weights are stored in ``dtype`` (``cast_frozen``), its GroupNorms keep half-precision activations in
    half precision (``keep_norms_in_half_precision``) and its LoRA layers stop copying their inputs up to fp32
    (``keep_lora_inputs_in_half_precision``).

    Args:
        generator: the model, changed in place (parameters shared between its parts stay shared).
        dtype: ``torch.bfloat16`` or ``torch.float16``.
    """
    cast_frozen(generator, dtype)
    keep_norms_in_half_precision(generator)
    keep_lora_inputs_in_half_precision(generator)


def use_math_attention(module: torch.nn.Module) -> None:
    """Compute attention as plain matrix products (softmax(QK^T / sqrt(d)) V) in every attention layer of ``module``:
    diffusers' ``AttnProcessor`` in the UNet and VAE, transformers' ``"eager"`` implementation in the CLIP text model.

    On the CPU, PyTorch's fused (flash) attention kernel has a slow backward pass for short sequences and small heads.
    On the demo model (77 text tokens with 4 heads of 16, 64 latent tokens with 2 heads of 32), the fused kernel makes
    a training step 1.13x slower on this project's 2-core CPU (``benchmarks/demo_step.py``). The plain form
    materialises the (tokens x tokens) score matrix: small here, but it grows with the square of the image area, so
    the paired trainer uses it on the CPU only, where training images are small.

    Args:
        module: a model holding diffusers ``Attention`` layers and / or transformers models; changed in place (the
            weights are untouched, the result is the same up to rounding).
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor
    from transformers import PreTrainedModel

    for child in module.modules():
        if isinstance(child, Attention):
            child.set_processor(AttnProcessor())
        elif isinstance(child, PreTrainedModel):
            child.set_attn_implementation("eager")
