"""Optimiser, LR-scheduler and loss-scaler states in one safetensors file, without pickle.

``torch.save`` would pickle these nested dicts; we keep no pickles of our own (a checkpoint passed around must never be
able to run code when resumed). The tensors are stored as safetensors tensors; the structure around them (dicts with
int or str keys, lists, tuples, numbers, strings, None) as JSON in the file's metadata, each tensor by its index.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STRUCTURE_KEY = "turbo_i2i_structure"
_PLAIN = (bool, int, float, str, type(None))


def save_state(state: dict, path: str | os.PathLike) -> None:
    """Write nested optimiser/scheduler/scaler state dicts to one safetensors file.

    Args:
        state: e.g. ``{"optimizer_g": optimizer.state_dict(), "scheduler_g": scheduler.state_dict()}``.
        path: the file to write.

    Raises:
        TypeError: the state holds something other than tensors, containers and plain values.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    save_file(tensors, str(path), metadata={STRUCTURE_KEY: json.dumps(structure)})


def load_state(path: str | os.PathLike) -> dict:
    """Read what :func:`save_state` wrote, exactly (tensors on the CPU, tuples as tuples, int keys as ints).

    Args:
        path: the file.

    Returns:
        The nested state.

    Raises:
        ValueError: the file is not one of ours (no structure), or its structure names tensors it lacks.
        safetensors.SafetensorError / OSError: the file is damaged or unreadable.
    """
    with safe_open(str(path), framework="pt", device="cpu") as file:
        metadata = file.metadata() or {}
        if STRUCTURE_KEY not in metadata:
            raise ValueError(f"{path} holds no {STRUCTURE_KEY} metadata; it was not written by save_state")
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    return _decode(json.loads(metadata[STRUCTURE_KEY]), tensors)


def _encode(value, tensors: dict[str, torch.Tensor]):
    """One value as JSON, its tensors moved into ``tensors`` (tagged: int keys and tuples come back as they were)."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[_key(key), _encode(item, tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(item, tensors) for item in value]}
    if isinstance(value, _PLAIN):
        return {"value": value}
    raise TypeError(f"cannot store a {type(value).__name__} in a training state file")


def _key(key):
    if not isinstance(key, (int, str)):
        raise TypeError(f"cannot store a {type(key).__name__} key in a training state file")
    return key


def _decode(node: dict, tensors: dict[str, torch.Tensor]):
    ((kind, body),) = node.items()
    if kind == "tensor":
        if body not in tensors:
            raise ValueError(f"the structure names tensor {body!r}, which the file lacks")
        return tensors[body]
    if kind == "dict":
        return {key: _decode(item, tensors) for key, item in body}
    if kind in ("list", "tuple"):
        items = [_decode(item, tensors) for item in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "value":
        return body
    raise ValueError(f"unknown entry {kind!r} in the structure")
