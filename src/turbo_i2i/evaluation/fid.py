"""FID (Heusel et al. 2017) in clean-fid's "clean" mode (Parmar, Zhang, Zhu 2022), on folders or in-memory tensors.

Clean mode is what the pix2pix-Turbo / CycleGAN-Turbo paper reports: every image, as 8-bit RGB, is resized to
299 x 299 with PIL's bicubic filter on float channels (no quantisation after the resize), then fed in [0, 255] to the
2015 TensorFlow Inception v3 ported to TorchScript, whose 2048-d pool features are compared as Gaussians. The resize
and the network are clean-fid's own (a test checks that folder FIDs equal ``cleanfid.fid.compute_fid``'s). The file
handling is ours, so that images load with the same checks as everywhere else in turbo-i2i (files upright by their
EXIF orientation, as translate reads its inputs; clean-fid ignores it) and tensors (generator outputs in [-1, 1]) are
quantised exactly as saving them to PNG would; a folder is read with its sub-folders, as clean-fid reads it. The
Frechet distance is clean-fid's formula, written out for SciPy 1.18 (see ``frechet_distance``).

Trainers cache the reference side once (``fid_statistics(test_images, net)``, the target domain's whole test split)
and call ``compute_fid(outputs, reference_stats, net)`` on every evaluation.
"""

from __future__ import annotations

import os
import urllib.error
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import preprocess as pre
from ..errors import BadInputError, TurboI2IError

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
# Where clean-fid itself saves the network (its feature_extractor() hard-codes /tmp on Linux and macOS), so a copy a
# user already has from running clean-fid is found.
CLEANFID_FOLDER = Path("/tmp")
FID_SIZE = 299

# An image source: a folder, image files, a (N, 3, H, W) tensor or a list of (3, H, W) tensors in [-1, 1], PIL
# images, or 8-bit HWC RGB arrays.
Images = str | os.PathLike | torch.Tensor | Sequence


def _cleanfid():
    try:
        import cleanfid.fid
        import cleanfid.resize
    except ImportError as error:
        raise TurboI2IError(
            "FID needs the clean-fid package, which is not installed; install it with"
            ' `pip install "turbo-i2i[train]"` (or `pip install clean-fid`).'
        ) from error
    return cleanfid


@dataclass
class FIDStatistics:
    """The Gaussian an image set's Inception features are summarised by.

    Args:
        mu: mean feature, shape (D,).
        sigma: feature covariance, shape (D, D).
        n: how many images it was computed from.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int


# ---------------------------------------------------------------------------------------------------- networks


def _inception_candidates(path: str | os.PathLike | None) -> list[Path]:
    if path is not None:
        return [Path(path)]
    return [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE, CLEANFID_FOLDER / INCEPTION_FILE]


def _usable(candidate: Path) -> bool:
    """Whether an Inception file found without being asked for may be loaded: in clean-fid's shared /tmp, only a copy
    this user owns (anyone on the machine can put a file there, and it would be loaded as code and decide every FID);
    a file the user names is theirs to choose."""
    if not candidate.is_file():
        return False
    if candidate.parent != CLEANFID_FOLDER or not hasattr(os, "getuid"):
        return True
    return candidate.stat().st_uid == os.getuid()


def _inception_missing(looked_for: Sequence[Path], reason: str) -> str:
    """The message for an Inception network that could not be loaded, with how to provide it."""
    where = " and ".join(str(p) for p in looked_for)
    return (
        f"Could not load the Inception v3 network FID is measured with ({reason}). It was looked for as {where}."
        f" To provide it: download {INCEPTION_URL} once on a machine with a network and copy the file to"
        f" {looked_for[0]}, or pass path= a local copy of {INCEPTION_FILE};"
        f" with HF_HUB_OFFLINE=1 nothing is downloaded, unset it to let it be fetched."
    )


def load_inception(
    path: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """clean-fid's Inception v3 feature network (the 2015 TensorFlow weights as TorchScript), frozen.

    Looked for in the torch hub cache (``torch.hub.get_dir()/checkpoints``, moved by ``TORCH_HOME``), then where
    clean-fid keeps it (``/tmp``, a copy this user owns); downloaded into the torch hub cache when missing and
    downloads are allowed.

    Args:
        path: a local copy of ``inception-2015-12-05.pt`` to use instead.
        local_files_only: never download (defaults to the ``HF_HUB_OFFLINE`` setting).
        device: where to put the network (CPU when None).

    Returns:
        a module mapping (N, 3, 299, 299) images in [0, 255] to (N, 2048) features, in eval mode without gradients.

    Raises:
        BadInputError: ``path`` does not exist, or the file found cannot be read.
        TurboI2IError: the network is neither on disk nor downloadable (one paragraph saying how to provide it), or
            clean-fid is not installed.
    """
    from ..errors import load_failure
    from ..hub import hub_offline
    from ..training.pretrained import freeze

    if path is not None and not Path(path).is_file():
        raise BadInputError(f"Inception weights file {str(path)!r} does not exist.")
    candidates = _inception_candidates(path)
    found = next((p for p in candidates if (p.is_file() if path is not None else _usable(p))), None)
    if found is None:
        offline = hub_offline() if local_files_only is None else local_files_only
        if offline:
            raise TurboI2IError(_inception_missing(candidates, "not on disk and offline"))
        found = candidates[0]
        found.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(found), progress=True)
        except (OSError, urllib.error.URLError, RuntimeError) as error:
            raise TurboI2IError(_inception_missing(candidates, load_failure(error))) from error
    try:
        with warnings.catch_warnings():  # the file is TorchScript, whose loader torch now marks as deprecated
            warnings.simplefilter("ignore", FutureWarning)
            net = InceptionFeatures(torch.jit.load(str(found), map_location="cpu"))
    except (OSError, RuntimeError, ValueError, AttributeError) as error:
        # a damaged file is bad input (exit 2), as a damaged model file is
        raise BadInputError(
            f"{found} is not a readable copy of the Inception network FID is measured with (unreadable:"
            f" {load_failure(error)}); download {INCEPTION_URL} again and use that copy."
        ) from error
    net = freeze(net)
    return net.to(device) if device is not None else net


class InceptionFeatures(nn.Module):
    """The TorchScript Inception v3 run the way clean-fid's ``InceptionV3W`` runs it in clean mode: inputs already
    resized to 299 x 299, scaled from [0, 255] to [-1, 1], 2048-d pool features out.

    Args:
        scripted: the loaded ``inception-2015-12-05.pt``.
    """

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.layers = scripted.eval().layers  # fails on a file that is not this network, so load_inception says so

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of (N, 3, 299, 299) images in [0, 255] -> (N, 2048)."""
        return self.layers.forward((x - 128) / 128).view(x.shape[0], 2048)


class TinyInception(nn.Module):
    """A stand-in for the FID Inception net with random weights: same call, (N, 3, 299, 299) in [0, 255] ->
    (N, dim) features, built in milliseconds and needing no download. Its FIDs mean nothing outside tests.

    Args:
        dim: feature size (keep it below the number of test images so the covariances are full rank).
    """

    def __init__(self, dim: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.AvgPool2d(8),  # 299 -> 37: only coarse content matters to a stand-in
            nn.Conv2d(3, 16, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of images in [0, 255] -> (N, dim)."""
        return self.features((x - 128.0) / 128.0)


def tiny_inception(seed: int = 0, dim: int = 8) -> TinyInception:
    """A frozen ``TinyInception`` with random weights from ``seed`` (the caller's RNG untouched)."""
    from ..training.pretrained import freeze

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return freeze(TinyInception(dim))


# ---------------------------------------------------------------------------------------------------- features


def _as_arrays(images: Images) -> Iterable[np.ndarray]:
    """Yield 8-bit (H, W, 3) RGB arrays from any supported image source, one at a time."""
    if isinstance(images, (str, os.PathLike)):
        images = pre.list_images(images, recursive=True)  # as clean-fid globs a folder (sub-folders included)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise BadInputError(f"FID expects images as (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}.")
        images = list(images)
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            image = pre.load_image(image)
        if isinstance(image, torch.Tensor):
            # The same 8-bit quantisation as writing the output to PNG and reading it back.
            image = pre.tensor_to_pil(image)[0]
        if isinstance(image, Image.Image):
            image = np.asarray(pre.to_rgb(image))  # 16-bit pictures scaled, as when read from a file
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise BadInputError(
                "FID images must be paths, PIL images, (3, H, W) tensors in [-1, 1] or uint8 (H, W, 3) arrays;"
                f" got {type(image).__name__}."
            )
        yield image


def clean_resize(image: np.ndarray) -> torch.Tensor:
    """clean-fid's clean-mode preprocessing of one image.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (3, 299, 299) float32 in [0, 255]: PIL bicubic on float channels, clipped, not re-quantised.
    """
    resize = _cleanfid().resize.build_resizer("clean")
    return torch.from_numpy(np.ascontiguousarray(resize(image).transpose(2, 0, 1)))


@torch.no_grad()
def image_features(images: Images, net: nn.Module, batch_size: int = 32) -> np.ndarray:
    """Inception (or stand-in) features of an image set, preprocessed in clean mode.

    Args:
        images: a folder, image paths, a (N, 3, H, W) tensor or list of (3, H, W) tensors in [-1, 1], PIL images or
            uint8 (H, W, 3) arrays; sizes may differ.
        net: the feature network (``load_inception()`` or ``tiny_inception()``); it runs where its weights are.
        batch_size: images per forward pass.

    Returns:
        (N, D) float64 features.

    Raises:
        BadInputError: an image cannot be read, or the set is empty.
    """
    device = next(net.parameters()).device
    batches, batch = [], []
    for array in _as_arrays(images):
        batch.append(clean_resize(array))
        if len(batch) == batch_size:
            batches.append(net(torch.stack(batch).to(device)).double().cpu().numpy())
            batch = []
    if batch:
        batches.append(net(torch.stack(batch).to(device)).double().cpu().numpy())
    if not batches:
        raise BadInputError("FID got an empty image set.")
    return np.concatenate(batches)


def fid_statistics(images: Images, net: nn.Module, batch_size: int = 32) -> FIDStatistics:
    """Mean and covariance of an image set's features, to reuse as one side of many FIDs.

    Args:
        images: any source ``image_features`` takes; at least 2 images.
        net: the feature network.
        batch_size: images per forward pass.

    Returns:
        the set's ``FIDStatistics``.

    Raises:
        BadInputError: fewer than 2 images (a covariance needs two), or an unreadable image.
    """
    features = image_features(images, net, batch_size)
    if len(features) < 2:
        raise BadInputError(f"FID needs at least 2 images per set, got {len(features)}.")
    return FIDStatistics(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False), n=len(features))


def frechet_distance(a: FIDStatistics, b: FIDStatistics, eps: float = 1e-6) -> float:
    """The Frechet distance of two Gaussians, ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    The same numerically stabilised computation as clean-fid's ``frechet_distance`` (and pytorch-fid's), written out
    here because clean-fid's passes ``disp=`` to ``scipy.linalg.sqrtm``, which SciPy removes in 1.18.

    Args:
        a: statistics of one set.
        b: statistics of the other, same feature size.
        eps: added to both covariances' diagonals when their product has no finite square root.

    Returns:
        the distance (>= 0 up to float error).

    Raises:
        TurboI2IError: the square root is far from real (degenerate statistics, e.g. from very few images).
    """
    from scipy import linalg

    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma.dot(b.sigma))
    if not np.isfinite(covmean).all():  # a near-singular product: regularise both covariances
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset).dot(b.sigma + offset))
    if np.iscomplexobj(covmean):  # rounding leaves a tiny imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise TurboI2IError(
                f"FID failed: the covariance square root has an imaginary part of {np.abs(covmean.imag).max():.3g}"
                f" (statistics of {a.n} and {b.n} images); use more images."
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def compute_fid(
    outputs: Images | FIDStatistics,
    references: Images | FIDStatistics,
    net: nn.Module,
    batch_size: int = 32,
) -> float:
    """Clean-mode FID between two image sets.

    Args:
        outputs: generated images: a folder, paths, a (N, 3, H, W) tensor or list of (3, H, W) tensors in [-1, 1]
            (e.g. generator outputs held in memory), PIL images, uint8 arrays, or precomputed ``FIDStatistics``.
        references: the real images, in any of the same forms (cache ``fid_statistics(folder, net)`` once when the
            same references are scored again and again).
        net: the feature network: ``load_inception(device=...)`` for real numbers, ``tiny_inception()`` in tests.
        batch_size: images per forward pass.

    Returns:
        the FID (lower is better; ~0 for a set against itself). With few images it is biased upwards: compare FIDs
        only between runs that use the same number of images.

    Raises:
        BadInputError: a set has fewer than 2 images or an image cannot be read.
    """
    a = outputs if isinstance(outputs, FIDStatistics) else fid_statistics(outputs, net, batch_size)
    b = references if isinstance(references, FIDStatistics) else fid_statistics(references, net, batch_size)
    return frechet_distance(a, b)
