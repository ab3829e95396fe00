"""Start a training run from an existing model (``turbo-i2i train paired --from-model ...``).

The paper's sketch model starts from the edge model with larger LoRA ranks and an r-blended ``conv_in``. The trained
tensors of the source model are copied into the new generator so that it computes exactly what the source computes:

- tensors of the same shape are copied;
- a LoRA of a larger rank keeps the source's A in its first rows (the new rows keep their random init) and the
  source's B in its first columns, rescaled by the ratio of the two LoRA scalings (alpha / rank), with the new
  columns zero, so B @ A * scaling is unchanged;
- ``conv_in`` maps to the trained branch of the stochastic model's ``TwinConv`` (and back).
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import BadInputError
from ..generator import OneStepGenerator

logger = logging.getLogger("turbo_i2i")
TWIN = "unet.conv_in.conv_in_curr."
PLAIN = "unet.conv_in."


def _scalings(generator: OneStepGenerator) -> dict[str, float]:
    config = generator.config
    return {
        "unet.": config.unet_lora_alpha / config.unet_lora_rank,
        "vae.": config.vae_lora_alpha / config.vae_lora_rank,
    }


def _target_name(name: str, params: dict) -> str:
    if name in params:
        return name
    if name.startswith(PLAIN) and TWIN + name.removeprefix(PLAIN) in params:  # deterministic -> stochastic
        return TWIN + name.removeprefix(PLAIN)
    if name.startswith(TWIN) and PLAIN + name.removeprefix(TWIN) in params:  # stochastic -> deterministic
        return PLAIN + name.removeprefix(TWIN)
    raise BadInputError(
        f"The starting model has a tensor {name!r} that the new model lacks: it was made for another task or"
        f" backbone than this run's --base-model."
    )


def fit_trained_tensors(
    source: dict[str, torch.Tensor], source_scalings: dict[str, float], target: OneStepGenerator
) -> dict[str, torch.Tensor]:
    """Map a source model's trained tensors onto ``target``'s parameters (see the module docstring).

    Args:
        source: the source model's ``trained_state_dict()``.
        source_scalings: its LoRA scalings (alpha / rank) by prefix, ``{"unet.": ..., "vae.": ...}``.
        target: the new generator (its current values fill what the source does not cover).

    Returns:
        target parameter name -> tensor, ready for ``load_trained_state_dict``.

    Raises:
        BadInputError: a tensor the target does not have, or a shape that no rank growth explains.
    """
    params = dict(target.named_parameters())
    scalings = _scalings(target)
    fitted = {}
    for name, tensor in source.items():
        key = _target_name(name, params)
        current = params[key].detach()
        tensor = tensor.to(current.dtype)
        if tensor.shape == current.shape:
            fitted[key] = tensor
            continue
        grown = tensor.ndim == current.ndim and tensor.shape[2:] == current.shape[2:]
        if grown and "lora_A" in key and tensor.shape[1] == current.shape[1] and tensor.shape[0] < current.shape[0]:
            fitted[key] = current.clone()
            fitted[key][: tensor.shape[0]] = tensor
        elif grown and "lora_B" in key and tensor.shape[0] == current.shape[0] and tensor.shape[1] < current.shape[1]:
            prefix = "unet." if key.startswith("unet.") else "vae."
            fitted[key] = torch.zeros_like(current)
            fitted[key][:, : tensor.shape[1]] = tensor * (source_scalings[prefix] / scalings[prefix])
        else:
            raise BadInputError(
                f"Tensor {name!r} has shape {tuple(tensor.shape)} in the starting model but {tuple(current.shape)}"
                f" in the new one; only LoRA ranks may grow."
            )
    return fitted


def warm_start(
    generator: OneStepGenerator, model: str | os.PathLike, text_encoder: torch.nn.Module | None = None
) -> None:
    """Load ``model``'s trained weights into ``generator`` (see ``fit_trained_tensors``), in place.

    A model trained from scratch (``train_all``) also carries its own text encoder, which is loaded into
    ``text_encoder``: without it the new run would start from another caption embedding than the source's.

    Args:
        generator: the freshly built generator of the new run.
        model: a named model, a model folder, an official ``.pkl`` file or a hub id (as ``Translator`` takes).
        text_encoder: the new run's text encoder (needed when ``model`` was trained from scratch).

    Raises:
        BadInputError: the source is of another task, was trained from scratch and the new run is not (or the
            reverse), or its tensors do not fit (``fit_trained_tensors``).
        TypeError: the source was trained from scratch and no ``text_encoder`` was given.
    """
    from ..registry import load_model

    source, source_backbone = load_model(model, base_model=generator.config.base_model)
    if source.config.task != generator.config.task:
        raise BadInputError(
            f"{model} is a {source.config.task} model, made for another task than this run's"
            f" ({generator.config.task}): start from a {generator.config.task} model."
        )
    if source.config.train_all != generator.config.train_all:
        trained = "every weight (--train-all)" if source.config.train_all else "adapters only"
        raise BadInputError(
            f"{model} was trained with {trained}; a run starting from it must be too"
            f" ({'add' if source.config.train_all else 'drop'} --train-all)."
        )
    fitted = fit_trained_tensors(source.trained_state_dict(), _scalings(source), generator)
    expected = {n for n, _ in generator.named_parameters() if generator.is_trained(n)}
    left = expected - set(fitted)
    if left:
        logger.warning("%d trained tensors are not in %s and keep their initial values", len(left), model)
    generator.load_trained_state_dict(fitted, allow_missing=frozenset(left))
    if source.config.train_all:
        if text_encoder is None:
            # a programming error of the caller (both trainers pass it), not bad user input
            raise TypeError(f"{model} was trained from scratch: pass the run's text_encoder to load its own into.")
        text_encoder.load_state_dict(source_backbone.text_encoder.state_dict())
