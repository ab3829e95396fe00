"""Reading pickled tensors (the official checkpoints, torchvision weights) without running any pickled code; a
module of its own so the evaluation path does not import the model code to use it."""

from __future__ import annotations

import os
import warnings

import torch


def load_tensor_pickle(path: str | os.PathLike) -> object:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``): no pickled code runs.

    torch's note on a pickle protocol other than its own is left out: it says nothing about whether the file is safe,
    and it would be printed above our message for a refused file.

    Args:
        path: the pickle.

    Returns:
        what it holds.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)
