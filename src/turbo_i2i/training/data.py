"""Paired training data for pix2pix-Turbo: (input, target, caption) triples from a folder or a JSONL manifest.

Two sources are read:

* a folder in the pix2pix-Turbo layout: ``train_A/`` (inputs), ``train_B/`` (targets with the same file names),
  ``train_prompts.json`` ({file name: caption}) and the same three for ``test``;
* a ``.jsonl`` manifest with one ``{"input": path, "target": path, "prompt": caption}`` object per line; relative
  paths are relative to the manifest's folder.

The whole data set is validated when it is opened, before any training step, and every problem found (a missing
partner or caption, an unreadable or truncated image, a size mismatch, a bad manifest line) is reported in one
:class:`~turbo_i2i.errors.BadInputError`, so a user fixes them all in one go instead of one per crashed run.

Random transforms draw from a ``torch.Generator`` seeded from (seed, epoch, index) alone, never from the global RNG:
an item is the same whatever was drawn before, which is what lets a resumed training run equal an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import BadInputError, format_problems
from ..preprocess import IMAGE_EXTENSIONS, is_image_file, load_image, pil_to_tensor

logger = logging.getLogger("turbo_i2i")
SPLITS = ("train", "test")
# The names pix2pix-Turbo's training script accepts, plus "resize_N" for any side N (e.g. "resize_64").
TRANSFORMS = ("resize_512", "resized_crop_512", "resize_286_randomcrop_256x256_hflip", "no_resize", "resize_N")
MANIFEST_KEYS = ("input", "target", "prompt")

# "resize_N" and the official "resize_WxH" spelling ("resize_512x512").
_RESIZE_PATTERN = re.compile(r"resize_(\d+)(?:x(\d+))?")
# A typo such as "resize_5120000" would otherwise try to allocate a picture of terapixels per item.
_MAX_SIDE = 8192
_WARN_LISTED = 5
# Image checks are I/O and Pillow decoding, which releases the GIL, so a few threads shorten opening a big data set.
_CHECK_THREADS = min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairTransform:
    """Geometric transform applied identically to an input and its target (same crop box, same flip).

    Steps run in this order, each only if set: resize to a fixed size, resize the shorter side keeping the aspect
    ratio, centre crop, random crop, random horizontal flip. A plain dataclass rather than a closure so a data set
    holding it can be pickled into DataLoader worker processes.

    Attributes:
        name: the name it was built from.
        resize: (width, height) to resize to, or None.
        shorter_side: the length to resize the shorter side to, or None.
        center_crop: side of the square centre crop, or None.
        random_crop: (width, height) of the random crop, or None.
        hflip: flip left-right with probability 1/2.
    """

    name: str
    resize: tuple[int, int] | None = None
    shorter_side: int | None = None
    center_crop: int | None = None
    random_crop: tuple[int, int] | None = None
    hflip: bool = False

    def __call__(
        self, input_image: Image.Image, target_image: Image.Image, generator: torch.Generator
    ) -> tuple[Image.Image, Image.Image]:
        """Transform a pair.

        Args:
            input_image: the input picture.
            target_image: the target picture, the same size as the input.
            generator: the source of the random crop and flip; draws happen in a fixed order (crop top, crop left,
                flip), so the same generator state always gives the same result.

        Returns:
            (input, target) after the same steps.
        """
        input_image, target_image = self.apply([input_image, target_image], generator)
        return input_image, target_image

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) ``apply`` makes of an image of ``size`` (width, height)."""
        if self.resize is not None:
            size = self.resize
        if self.shorter_side is not None:
            size = _shorter_side_size(size, self.shorter_side)
        if self.center_crop is not None:
            size = (self.center_crop, self.center_crop)
        if self.random_crop is not None:
            size = self.random_crop
        return size

    def size_problem(self, size: tuple[int, int], option: str = "--transform") -> str | None:
        """Why an image of ``size`` cannot be trained on after this transform, or None: the generator needs sides
        that are multiples of 8 (the VAE works on 8x8 pixel blocks); training does not pad as translation does.
        ``option`` is the one that sets this transform, named in the advice."""
        width, height = self.output_size(size)
        if width % 8 == 0 and height % 8 == 0:
            return None
        made = "" if (width, height) == tuple(size) else f", which {self.name} makes {width}x{height}"
        return (
            f"is {size[0]}x{size[1]}{made}: training needs sides that are multiples of 8; use a resizing transform"
            f" such as resize_512 ({option})"
        )

    def apply(self, images: list[Image.Image], generator: torch.Generator) -> list[Image.Image]:
        """Transform images of one size identically (one crop box, one flip); unpaired data passes a single image.

        Args:
            images: pictures of the same size.
            generator: the source of the random crop and flip (drawn in the order crop top, crop left, flip).

        Returns:
            the transformed pictures, in order.
        """
        if self.resize is not None:
            images = [image.resize(self.resize, Image.Resampling.LANCZOS) for image in images]
        if self.shorter_side is not None:
            size = _shorter_side_size(images[0].size, self.shorter_side)
            images = [image.resize(size, Image.Resampling.LANCZOS) for image in images]
        if self.center_crop is not None:
            box = _center_box(images[0].size, self.center_crop)
            images = [image.crop(box) for image in images]
        if self.random_crop is not None:
            box = _random_box(images[0].size, self.random_crop, generator)
            images = [image.crop(box) for image in images]
        if self.hflip and bool(torch.rand((), generator=generator) < 0.5):
            images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
        return images


def build_transform(name: str) -> PairTransform:
    """Turn a transform name into a :class:`PairTransform`.

    Args:
        name: one of ``TRANSFORMS``: "resize_512" (to 512x512), "resized_crop_512" (shorter side to 512, then a
            centre 512x512 crop), "resize_286_randomcrop_256x256_hflip" (to 286x286, a random 256x256 crop, a random
            horizontal flip), "no_resize", or "resize_N" / "resize_WxH" for any size.

    Returns:
        The transform.

    Raises:
        BadInputError: the name is unknown (the message lists the known ones) or the size is out of range.
    """
    if name == "no_resize":
        return PairTransform(name)
    if name == "resized_crop_512":
        return PairTransform(name, shorter_side=512, center_crop=512)
    if name == "resize_286_randomcrop_256x256_hflip":
        return PairTransform(name, resize=(286, 286), random_crop=(256, 256), hflip=True)
    match = _RESIZE_PATTERN.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise BadInputError(
            f"Unknown transform {name!r}; use one of: {', '.join(TRANSFORMS)} (any size N, e.g. resize_256)."
        )
    width = int(match.group(1))
    height = int(match.group(2) or width)
    if not (1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE):
        raise BadInputError(f"Transform {name!r}: the size must be between 1 and {_MAX_SIDE} pixels.")
    if width % 8 or height % 8:  # the VAE works on 8x8 pixel blocks
        up = ((width + 7) // 8 * 8, (height + 7) // 8 * 8)
        nearest = f"resize_{up[0]}" if match.group(2) is None else f"resize_{up[0]}x{up[1]}"
        raise BadInputError(f"Transform {name!r}: the sides must be multiples of 8, e.g. {nearest}.")
    return PairTransform(name, resize=(width, height))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random generator of one item in one epoch.

    The seed is a hash of the three numbers rather than e.g. ``seed + epoch * N + index``, so neighbouring
    (epoch, index) pairs never share a stream and the data set size does not matter.

    Args:
        seed: the data set seed.
        epoch: the epoch.
        index: the item index.

    Returns:
        A CPU ``torch.Generator`` whose state depends only on (seed, epoch, index).
    """
    key = f"{operator.index(seed)}:{operator.index(epoch)}:{operator.index(index)}".encode()
    digest = hashlib.sha256(key).digest()
    # 63 bits: manual_seed accepts any 64-bit value, but staying non-negative keeps it portable.
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _shorter_side_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``side`` and the aspect ratio kept, rounded as torchvision's Resize."""
    width, height = size
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def _center_box(size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a centred square crop, placed as torchvision's CenterCrop does."""
    width, height = size
    left = int(round((width - side) / 2.0))
    top = int(round((height - side) / 2.0))
    return left, top, left + side, top + side


def _random_box(size: tuple[int, int], crop: tuple[int, int], generator: torch.Generator) -> tuple[int, int, int, int]:
    """A uniformly random (left, top, right, bottom) crop box inside an image of ``size``."""
    width, height = size
    crop_width, crop_height = crop
    if crop_width > width or crop_height > height:
        raise BadInputError(f"Cannot crop {crop_width}x{crop_height} out of a {width}x{height} image.")
    top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
    return left, top, left + crop_width, top + crop_height


# ---------------------------------------------------------------------------------------------------------------------
# Finding and validating pairs
# ---------------------------------------------------------------------------------------------------------------------


class EvalImages(Sequence):
    """Evaluation images read when accessed (again at each access), so a whole test split held as FID's reference set
    costs no memory until it is used, and then one image at a time.

    Args:
        count: how many images.
        load: index -> (3, H, W) float32 tensor in [-1, 1].
    """

    def __init__(self, count: int, load: Callable[[int], torch.Tensor]):
        self.count, self.load = count, load

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        """The image at ``index`` (a list for a slice).

        Raises:
            IndexError: out of range (which also ends an iteration).
        """
        if isinstance(index, slice):
            return [self.load(i) for i in range(self.count)[index]]
        return self.load(range(self.count)[index])


@dataclass(frozen=True)
class PairRecord:
    """One validated pair.

    Attributes:
        input: the input image file.
        target: the target image file.
        prompt: the caption.
        name: the input's file name, e.g. "000001.png" (not necessarily unique in a manifest).
    """

    input: Path
    target: Path
    prompt: str
    name: str


@dataclass
class _Candidate:
    """A pair as found, before validation; a missing part is None.

    ``prefix`` starts every problem message of the pair (a manifest line number); the labels name its files in
    messages the way the user wrote them.
    """

    name: str
    input: Path | None
    target: Path | None
    prompt: str | None
    input_label: str = ""
    target_label: str = ""
    prefix: str = ""
    problems: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (width, height) after the transform

    def problem(self, message: str) -> None:
        """Record a problem of this pair."""
        self.problems.append(self.prefix + message)

    @property
    def ok(self) -> bool:
        """Usable: every part present and no problem found."""
        return not self.problems and None not in (self.input, self.target, self.prompt)

    def record(self) -> PairRecord:
        """The validated pair."""
        return PairRecord(self.input, self.target, self.prompt, self.name)


def _caption_problem(prompt: object) -> str | None:
    """Why a caption is unusable, or None if it is a non-empty string."""
    if not isinstance(prompt, str):
        return f"is a {type(prompt).__name__}, not text"
    if not prompt.strip():
        return "is empty"
    return None


def _list_folder(folder: Path, problems: list[str]) -> dict[str, Path] | None:
    """The image files directly in ``folder`` by file name (sorted), or None with a problem if it is unusable.

    Hidden files are skipped (see :func:`~turbo_i2i.preprocess.is_image_file`).
    """
    if not folder.exists():
        problems.append(f"folder {folder.name}/ is missing")
        return None
    if not folder.is_dir():
        problems.append(f"{folder.name} is a file, not a folder")
        return None
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        problems.append(f"folder {folder.name}/ cannot be listed ({exc.strerror or exc})")
        return None
    return {p.name: p for p in entries if is_image_file(p)}


def _read_prompts(path: Path, problems: list[str]) -> dict | None:
    """The {file name: caption} mapping of a prompts file, or None with a problem if it is unusable."""
    if not path.is_file():
        problems.append(f"captions file {path.name} is missing (it should map each file name to its caption)")
        return None
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problems.append(
            f"captions file {path.name} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        )
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"captions file {path.name} cannot be read as UTF-8 text ({exc})")
        return None
    if not isinstance(prompts, dict):
        problems.append(
            f"captions file {path.name} must hold a JSON object {{file name: caption}}, not a {type(prompts).__name__}"
        )
        return None
    return prompts


def _scan_folder(root: Path, split: str) -> tuple[list[_Candidate], list[str]]:
    """Find the pairs of one split of a folder data set.

    Args:
        root: the data set folder.
        split: "train" or "test".

    Returns:
        (one candidate per input file, problems not tied to one input: missing folders or captions file, targets
        without an input, no images).
    """
    if not root.is_dir():
        return [], [f"folder {root} does not exist"]
    problems: list[str] = []
    a, b, prompts_name = f"{split}_A", f"{split}_B", f"{split}_prompts.json"
    inputs = _list_folder(root / a, problems)
    targets = _list_folder(root / b, problems)
    prompts = _read_prompts(root / prompts_name, problems)
    if inputs is None:
        return [], problems
    if not inputs and not targets:
        problems.append(f"folder {a}/ holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")

    candidates = []
    for name, path in inputs.items():
        candidate = _Candidate(name, path, None, None, input_label=f"{a}/{name}", target_label=f"{b}/{name}")
        # A missing folder or captions file is one problem above, not one per pair; such pairs stay incomplete.
        if targets is not None:
            candidate.target = targets.get(name)
            if candidate.target is None:
                candidate.problem(f"{a}/{name} has no target {b}/{name}")
        if prompts is not None:
            _attach_caption(candidate, prompts, prompts_name)
        candidates.append(candidate)
    if targets is not None:
        problems += [f"{b}/{name} has no input {a}/{name}" for name in targets if name not in inputs]
    return candidates, problems


def _attach_caption(candidate: _Candidate, prompts: dict, prompts_name: str) -> None:
    """Set the candidate's caption from the prompts mapping, or record why it has none."""
    if candidate.name not in prompts:
        candidate.problem(f"{candidate.input_label} has no caption in {prompts_name}")
        return
    why = _caption_problem(prompts[candidate.name])
    if why is not None:
        candidate.problem(f"the caption of {candidate.input_label} in {prompts_name} {why}")
        return
    candidate.prompt = prompts[candidate.name]


def _scan_manifest(path: Path) -> tuple[list[_Candidate], list[str]]:
    """Find the pairs of a JSONL manifest, one candidate per non-blank line.

    Args:
        path: the manifest file.

    Returns:
        (candidates, problems not tied to one line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"manifest {path} cannot be read as UTF-8 text ({exc})"]
    candidates = [
        _parse_manifest_line(line, number, path.parent)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not candidates:
        return [], [f"manifest {path.name} holds no entries (one JSON object per line)"]
    return candidates, []


def _parse_manifest_line(line: str, number: int, base: Path) -> _Candidate:
    """Read one manifest line into a candidate; problems are prefixed with the line number."""
    candidate = _Candidate(f"line {number}", None, None, None, prefix=f"manifest line {number}: ")
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        candidate.problem(f"not valid JSON ({exc.msg} at column {exc.colno})")
        return candidate
    if not isinstance(entry, dict):
        candidate.problem(f"a JSON {type(entry).__name__}, not an object with keys {', '.join(MANIFEST_KEYS)}")
        return candidate
    missing = [key for key in MANIFEST_KEYS if key not in entry]
    if missing:
        candidate.problem(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    candidate.input = _manifest_path(candidate, entry, "input", base)
    candidate.target = _manifest_path(candidate, entry, "target", base)
    if candidate.input is not None:
        candidate.name = candidate.input.name
        candidate.input_label = str(entry["input"])
    if candidate.target is not None:
        candidate.target_label = str(entry["target"])
    if "prompt" in entry:
        why = _caption_problem(entry["prompt"])
        if why is None:
            candidate.prompt = entry["prompt"]
        else:
            candidate.problem(f"the prompt {why}")
    return candidate


def _manifest_path(candidate: _Candidate, entry: dict, key: str, base: Path) -> Path | None:
    """The image path under ``key``, resolved against the manifest's folder, or None with a problem."""
    if key not in entry:
        return None
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        candidate.problem(f"{key!r} must be a non-empty file path, got {value!r}")
        return None
    path = Path(value)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        candidate.problem(
            f"{key} {value!r} is not an image file; expected one ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
        return None
    return path if path.is_absolute() else base / path


def transform_option(split: str) -> str:
    """The command-line option that sets a split's transform (in messages that advise changing it)."""
    return "--transform" if split == "train" else "--eval-transform"


def _check_images(candidate: _Candidate, transform: PairTransform, option: str) -> None:
    """Decode both images of a candidate (as training will) and record unreadable files, size mismatches and sizes
    the model cannot take after ``transform``; the pair's size after it goes to ``candidate.size``."""
    sizes = {}
    for role, path in (("input", candidate.input), ("target", candidate.target)):
        if path is None:
            continue
        try:
            sizes[role] = load_image(path).size
        except BadInputError as exc:
            candidate.problem(str(exc))
    if len(sizes) == 2 and sizes["input"] != sizes["target"]:
        (iw, ih), (tw, th) = sizes["input"], sizes["target"]
        candidate.problem(
            f"input {candidate.input_label} is {iw}x{ih} but target {candidate.target_label} is {tw}x{th}; "
            "a pair must have one size"
        )
    elif "input" in sizes:
        problem = transform.size_problem(sizes["input"], option)
        if problem is not None:
            candidate.problem(f"input {candidate.input_label} {problem}")
        candidate.size = transform.output_size(sizes["input"])


def split_name(source: Path, split: str) -> str:
    """How messages name one split of a data set folder, e.g. "my_data (test split)".

    Args:
        source: the data set folder.
        split: "train" or "test".

    Returns:
        The name.
    """
    return f"{source} ({split} split)"


def report_problems(
    source: object,
    problems: list[str],
    n_found: int,
    n_usable: int,
    skip_bad: bool,
    units: tuple[str, str] = ("pair", "pairs"),
) -> None:
    """Refuse a data set with problems (all listed in one message), or with ``skip_bad`` warn once about the skipped.

    Args:
        source: the data set folder or manifest, as the user named it.
        problems: every problem found; "it holds no <units>" is appended when it is empty and nothing is usable.
        n_found: how many items (pairs, images) were found.
        n_usable: how many of them are usable.
        skip_bad: warn and go on instead of raising, as long as something is usable.
        units: the item's name, singular and plural ("pair", "pairs"; "image", "images").

    Raises:
        BadInputError: problems without ``skip_bad``, or nothing usable left.
    """
    one, many = units
    if not problems and not n_usable:
        problems.append(f"it holds no {many}")
    listing = format_problems(f"in the dataset {source}", problems)
    if problems and not skip_bad:
        raise BadInputError(listing)
    if not n_usable:
        raise BadInputError(listing + f"\nNo usable {one} is left after skipping the bad ones.")
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems[:_WARN_LISTED])
        more = len(problems) - _WARN_LISTED
        # logged, as the run's other warnings are ("warning: ..." on the command line)
        logger.warning(
            "Skipped %d of %d %s of the dataset %s, %d %s, e.g.:\n%s%s",
            n_found - n_usable, n_found, many, source, len(problems), "problem" if len(problems) == 1 else "problems",
            listed,
            f"\n  ... and {more} more" if more > 0 else "",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Data set
# ---------------------------------------------------------------------------------------------------------------------


class PairedDataset(Dataset):
    """Paired images and captions for pix2pix-Turbo training.

    Items are ``{"input": (3, H, W) float in [0, 1], "target": (3, H, W) float in [-1, 1], "prompt": str,
    "name": str}``: pix2pix-Turbo feeds the condition image in [0, 1] and compares the output with the target in the
    VAE's [-1, 1] range.

    Random transforms depend only on (seed, epoch, index). With DataLoader workers, call :meth:`set_epoch` before
    creating each epoch's iterator and do not use ``persistent_workers``, so the workers receive the new epoch.

    Attributes:
        source: the folder or manifest.
        split: the split read (ignored for a manifest).
        transform: the :class:`PairTransform` applied to every pair.
        seed: the seed of the random transforms.
        epoch: the current epoch (see :meth:`set_epoch`).
        pairs: the usable pairs, in order (sorted file names for a folder, line order for a manifest).
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
        """Find and validate every pair.

        Args:
            source: a folder in the ``train_A``/``train_B``/``train_prompts.json`` layout (and ``test_*``), or a
                ``.jsonl`` manifest of ``{"input", "target", "prompt"}`` objects.
            split: "train" or "test"; ignored for a manifest.
            transform: a transform name, see :func:`build_transform`.
            skip_bad: drop the pairs with problems (and warn once) instead of raising.
            seed: seed of the random transforms.

        Raises:
            BadInputError: an argument is invalid, or the data set has problems (all of them in one message) and
                ``skip_bad`` is False, or no usable pair is left.
        """
        if split not in SPLITS:
            raise BadInputError(f"Unknown split {split!r}; use one of: {', '.join(SPLITS)}.")
        self.transform = build_transform(transform)
        self.source = Path(source)
        self.split = split
        self.seed = operator.index(seed)
        self.epoch = 0
        candidates, problems = self._scan()
        with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
            # list() waits for every check; map keeps the candidates' order, so messages are deterministic.
            check = partial(_check_images, transform=self.transform, option=transform_option(split))
            list(pool.map(check, candidates))
        self.problems = problems + [problem for candidate in candidates for problem in candidate.problems]
        self.pairs = tuple(candidate.record() for candidate in candidates if candidate.ok)
        self.sizes = {candidate.size for candidate in candidates if candidate.ok}
        self._report(len(candidates), skip_bad)

    @property
    def _is_manifest(self) -> bool:
        """Whether the source is a JSONL manifest (one list of pairs) rather than a data set folder."""
        return self.source.suffix.lower() == ".jsonl" and not self.source.is_dir()

    def _scan(self) -> tuple[list[_Candidate], list[str]]:
        """Find the candidate pairs of the source, whichever kind it is."""
        if self._is_manifest:
            if not self.source.is_file():
                return [], [f"manifest {self.source} does not exist"]
            return _scan_manifest(self.source)
        if self.source.is_file():
            raise BadInputError(
                f"{self.source} is a file but not a .jsonl manifest; pass a data set folder or a .jsonl manifest."
            )
        return _scan_folder(self.source, self.split)

    def _report(self, n_candidates: int, skip_bad: bool) -> None:
        """Raise for the problems found, or with ``skip_bad`` warn about the dropped pairs."""
        # a manifest is one split; a folder's messages say which of its splits they are about
        name = self.source if self._is_manifest else split_name(self.source, self.split)
        report_problems(name, self.problems, n_candidates, len(self.pairs), skip_bad)

    def __len__(self) -> int:
        """The number of usable pairs."""
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops and flips :meth:`__getitem__` returns.

        Args:
            epoch: the epoch number.
        """
        self.epoch = operator.index(epoch)

    def __getitem__(self, index: int) -> dict:
        """Load, transform and convert one pair.

        Args:
            index: the pair index; negative indices count from the end.

        Returns:
            {"input": (3, H, W) float32 in [0, 1], "target": (3, H, W) float32 in [-1, 1], "prompt": str,
            "name": str}.

        Raises:
            IndexError: the index is out of range.
            BadInputError: an image became unreadable after the data set was opened.
        """
        # range() both bounds-checks and maps a negative index, so the generator always sees the canonical index.
        index = range(len(self.pairs))[index]
        record = self.pairs[index]
        generator = sample_generator(self.seed, self.epoch, index)
        input_image, target_image = self.transform(load_image(record.input), load_image(record.target), generator)
        return {
            "input": pil_to_tensor([input_image])[0],
            "target": pil_to_tensor([target_image], value_range=(-1.0, 1.0))[0],
            "prompt": record.prompt,
            "name": record.name,
        }


def check_batchable(dataset, batch_size: int) -> None:
    """Refuse, before training, images that ``collate`` could not batch at some later step.

    Args:
        dataset: a paired or unpaired data set (its ``sizes`` after its ``transform``).
        batch_size: images per batch.

    Raises:
        BadInputError: more than one image size with ``batch_size`` > 1; names the sizes.
    """
    if batch_size > 1 and len(dataset.sizes) > 1:
        sizes = sorted(dataset.sizes)
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:5]) + (f" and {len(sizes) - 5} more" if len(sizes) > 5 else "")
        raise BadInputError(
            f"The {dataset.split} images have {len(sizes)} sizes after {transform_option(dataset.split)}"
            f" {dataset.transform.name} ({shown}),"
            f" and a batch holds one size; use a resizing transform such as resize_512, or --batch-size 1."
        )


def collate(batch: Sequence[dict]) -> dict:
    """Batch items of :class:`PairedDataset` (the DataLoader ``collate_fn``).

    Args:
        batch: the items.

    Returns:
        {"input": (N, 3, H, W), "target": (N, 3, H, W), "prompt": list of N str, "name": list of N str}.

    Raises:
        BadInputError: the batch is empty or its images differ in size (e.g. "no_resize" on mixed sizes).
    """
    if len(batch) == 0:
        raise BadInputError("Cannot collate an empty batch.")
    shapes = {tuple(item[key].shape) for item in batch for key in ("input", "target")}
    if len(shapes) > 1:
        sizes = ", ".join(f"{w}x{h}" for _, h, w in sorted(shapes))
        raise BadInputError(
            f"Cannot batch images of different sizes ({sizes}); use a resizing transform such as resize_512, or a "
            "batch size of 1."
        )
    return {
        "input": torch.stack([item["input"] for item in batch]),
        "target": torch.stack([item["target"] for item in batch]),
        "prompt": [item["prompt"] for item in batch],
        "name": [item["name"] for item in batch],
    }
