"""Unpaired training data for CycleGAN-Turbo: two folders of images and one caption per domain.

The folder layout (the public CycleGAN-Turbo layout)::

    train_A/  train_B/          images of domain A and B; the two folders need not hold the same number of images
    test_A/   test_B/           held-out images of each domain (optional: without them there is no evaluation)
    fixed_prompt_a.txt          one caption describing domain A (e.g. "picture of a day street")
    fixed_prompt_b.txt          one caption describing domain B (e.g. "picture of a night street")

The data set is validated when it is opened, with the same rules and messages as the paired data (one
:class:`~turbo_i2i.errors.BadInputError` listing every problem; ``skip_bad`` skips unreadable images with one warning).
A missing folder or caption cannot be skipped.

Pairing is random and changes every epoch: epoch ``e`` shuffles each domain with a permutation drawn from
(seed, e, domain) alone, so a resumed run sees exactly the pairs an uninterrupted one sees.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import BadInputError
from ..preprocess import IMAGE_EXTENSIONS, load_image, pil_to_tensor
from .data import (
    _CHECK_THREADS,
    SPLITS,
    EvalImages,
    PairTransform,
    _list_folder,
    build_transform,
    report_problems,
    sample_generator,
    split_name,
    transform_option,
)

DOMAINS = ("A", "B")
CAPTION_FILES = {"A": "fixed_prompt_a.txt", "B": "fixed_prompt_b.txt"}
# Stream numbers that keep the per-epoch permutations of the two domains apart from each other and from the
# per-item transform streams (which use the item index, always >= 0).
_PERMUTATION_STREAM = {"A": -1, "B": -2}


def read_caption(path: Path, problems: list[str]) -> str | None:
    """The caption in a ``fixed_prompt_*.txt`` file (surrounding white space removed), or None with a problem.

    Args:
        path: the caption file.
        problems: where a problem is recorded.

    Returns:
        the caption, or None if the file is missing, unreadable or empty.
    """
    if not path.is_file():
        problems.append(f"caption file {path.name} is missing (it should hold one line describing the domain)")
        return None
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"caption file {path.name} cannot be read as UTF-8 text ({exc})")
        return None
    if not caption:
        problems.append(f"caption file {path.name} is empty")
        return None
    return caption


def _check_image(
    path: Path, label: str, transform: PairTransform, option: str
) -> tuple[str | None, tuple[int, int] | None]:
    """Why an image cannot be used (decoded as training will decode it, its size after ``transform``, which
    ``option`` sets), or None; and its size after the transform."""
    try:
        size = load_image(path).size
    except BadInputError as exc:
        return f"{label}: {exc}", None
    problem = transform.size_problem(size, option)
    return (None if problem is None else f"{label} {problem}"), transform.output_size(size)


def has_split(root: str | os.PathLike, split: str) -> bool:
    """Whether the data set folder has (part of) the split, i.e. ``<split>_A/`` or ``<split>_B/`` exists."""
    return any((Path(root) / f"{split}_{domain}").exists() for domain in DOMAINS)


class UnpairedDataset(Dataset):
    """Images of two domains and their captions, paired at random per epoch.

    Items are ``{"a": (3, H, W), "b": (3, H, W), "name_a": str, "name_b": str}``, images in [-1, 1] (CycleGAN-Turbo
    feeds and compares images in the VAE's range). An epoch has ``max(len A, len B)`` items: every image of the
    larger domain appears once, the smaller domain's shuffled list is repeated as needed.

    Attributes:
        source: the data set folder.
        split: "train" or "test".
        transform: the transform applied to every image (each image draws its own random crop and flip).
        seed: the seed of pairing and random transforms.
        epoch: the current epoch (see :meth:`set_epoch`).
        files: domain ("A" / "B") -> the usable image files, sorted by name.
        captions: domain -> caption.
        problems: every problem found at construction (non-empty only with ``skip_bad``).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        split: str = "train",
        transform: str = "no_resize",
        skip_bad: bool = False,
        seed: int = 0,
    ) -> None:
        """Find and validate every image and both captions.

        Args:
            source: a folder in the unpaired layout (see the module docstring).
            split: "train" or "test".
            transform: a transform name, see :func:`~turbo_i2i.training.data.build_transform`.
            skip_bad: drop unreadable images (and warn once) instead of raising.
            seed: seed of the pairing and of the random transforms.

        Raises:
            BadInputError: an invalid argument; or problems (all of them in one message) without ``skip_bad``; or a
                missing folder or caption, or a domain with no usable image, even with ``skip_bad``.
        """
        if split not in SPLITS:
            raise BadInputError(f"Unknown split {split!r}; use one of: {', '.join(SPLITS)}.")
        self.transform = build_transform(transform)
        self.source = Path(source)
        self.split = split
        self.seed = operator.index(seed)
        self.epoch = 0
        if not self.source.is_dir():
            raise BadInputError(format_missing(self.source))
        structural: list[str] = []  # problems that skipping images cannot fix
        found = {d: _list_folder(self.source / f"{split}_{d}", structural) for d in DOMAINS}
        captions = {d: read_caption(self.source / CAPTION_FILES[d], structural) for d in DOMAINS}
        endings = ", ".join(IMAGE_EXTENSIONS)
        for domain, files in found.items():
            if files is not None and not files:
                structural.append(f"folder {split}_{domain}/ holds no images (expected files ending in {endings})")
        checks = [(d, name, path) for d in DOMAINS for name, path in (found[d] or {}).items()]
        with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
            # map keeps the order of the files, so messages are deterministic.
            option = transform_option(split)
            results = list(
                pool.map(lambda c: _check_image(c[2], f"{split}_{c[0]}/{c[1]}", self.transform, option), checks)
            )
        image_problems = [problem for problem, _ in results]
        bad = {(d, name) for (d, name, _), problem in zip(checks, image_problems) if problem is not None}
        self.sizes = {size for problem, size in results if problem is None}
        self.files = {d: tuple(p for name, p in (found[d] or {}).items() if (d, name) not in bad) for d in DOMAINS}
        self.captions = {d: c for d, c in captions.items() if c is not None}
        self.problems = structural + [p for p in image_problems if p is not None]
        usable = sum(len(f) for f in self.files.values())
        if structural or not all(self.files.values()):
            usable = 0  # either domain missing: nothing can be trained, whatever skip_bad says
        report_problems(
            split_name(self.source, split), self.problems, len(checks), usable, skip_bad, ("image", "images")
        )

    def __len__(self) -> int:
        """Items per epoch: the size of the larger domain."""
        return max(len(files) for files in self.files.values())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose pairing, random crops and flips :meth:`__getitem__` returns.

        Args:
            epoch: the epoch number.
        """
        self.epoch = operator.index(epoch)

    def pairing(self, epoch: int) -> dict[str, torch.Tensor]:
        """The order of each domain's images in ``epoch``: item i uses ``order[d][i % len(d)]`` of domain d.

        Args:
            epoch: the epoch number.

        Returns:
            domain -> a permutation of its image indices, a function of (seed, epoch, domain) alone.
        """
        return {
            d: torch.randperm(len(self.files[d]), generator=sample_generator(self.seed, epoch, _PERMUTATION_STREAM[d]))
            for d in DOMAINS
        }

    def __getitem__(self, index: int) -> dict:
        """Load and transform item ``index`` of the current epoch.

        Args:
            index: the item index; negative indices count from the end.

        Returns:
            {"a": (3, H, W) float32 in [-1, 1], "b": ..., "name_a": str, "name_b": str}.

        Raises:
            IndexError: the index is out of range.
            BadInputError: an image became unreadable after the data set was opened.
        """
        index = range(len(self))[index]
        order = self.pairing(self.epoch)
        # One stream per item: A's draws first, then B's, always in that order, so an item never depends on others.
        generator = sample_generator(self.seed, self.epoch, index)
        item = {}
        for domain in DOMAINS:
            files = self.files[domain]
            path = files[int(order[domain][index % len(files)])]
            (image,) = self.transform.apply([load_image(path)], generator)
            item[domain.lower()] = pil_to_tensor([image], value_range=(-1.0, 1.0))[0]
            item[f"name_{domain.lower()}"] = path.name
        return item

    def images(self, domain: str, limit: int | None = None) -> list[tuple[str, torch.Tensor]]:
        """The images of one domain, in file-name order, without random transforms (for evaluation).

        Args:
            domain: "A" or "B".
            limit: at most this many (the first in name order); all when None.

        Returns:
            (file name, (3, H, W) float32 in [-1, 1]) pairs.
        """
        return [(path.name, tensor) for path, tensor in zip(self.files[domain][:limit], self.tensors(domain, limit))]

    def tensors(self, domain: str, limit: int | None = None) -> EvalImages:
        """``images`` without the names, each loaded when it is read (see ``EvalImages``).

        Args:
            domain: "A" or "B".
            limit: at most this many (the first in name order); all when None.

        Returns:
            a sequence of (3, H, W) float32 tensors in [-1, 1].
        """
        paths = self.files[domain][:limit]

        def load(index: int) -> torch.Tensor:
            # deterministic transforms see no randomness in evaluation
            (image,) = self.transform.apply([load_image(paths[index])], torch.Generator().manual_seed(0))
            return pil_to_tensor([image], value_range=(-1.0, 1.0))[0]

        return EvalImages(len(paths), load)


def format_missing(source: Path) -> str:
    """The message for a data set folder that does not exist (same wording as the paired data)."""
    return f"1 problem in the dataset {source}:\n  - folder {source} does not exist"


def collate_unpaired(batch: Sequence[dict]) -> dict:
    """Batch items of :class:`UnpairedDataset`.

    Args:
        batch: the items.

    Returns:
        {"a": (N, 3, H, W), "b": (N, 3, H, W), "name_a": list of N str, "name_b": list of N str}.

    Raises:
        BadInputError: the batch is empty or the images of one domain differ in size.
    """
    if len(batch) == 0:
        raise BadInputError("Cannot collate an empty batch.")
    out: dict = {}
    for key in ("a", "b"):
        shapes = {tuple(item[key].shape) for item in batch}
        if len(shapes) > 1:
            sizes = ", ".join(f"{w}x{h}" for _, h, w in sorted(shapes))
            raise BadInputError(
                f"Cannot batch images of different sizes ({sizes}); use a resizing transform such as resize_512, or "
                "a batch size of 1."
            )
        out[key] = torch.stack([item[key] for item in batch])
        out[f"name_{key}"] = [item[f"name_{key}"] for item in batch]
    return out
