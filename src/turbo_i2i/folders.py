"""Translate a folder of images, sub-folders included, into another folder: what ``turbo-i2i translate`` does with a
folder, for Python callers too.

The tree is mirrored (``photos/day/a.jpg`` -> ``out/day/a.png``); outputs are PNG, so nothing is lost to compression.
Images go through in batches; a file that cannot be read or translated is reported and the rest go on; outputs that
exist are kept unless ``overwrite``, so a stopped run continues where it was.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import preprocess as pre
from .captions import folder_captions, read_captions
from .errors import BadInputError

if TYPE_CHECKING:
    from .pipeline import Translator

logger = logging.getLogger("turbo_i2i")


# the options of Translator.__call__ that Translator.check_options takes
_CHECKED = ("prompt", "direction", "tile_size", "r", "edges", "canny_thresholds")


@dataclasses.dataclass
class FolderResult:
    """What ``translate_folder`` did.

    Args:
        translated: the output files written.
        skipped: outputs that existed and were kept (``overwrite`` off).
        failed: one line per input that could not be translated, naming it and why.
        inputs: how many images the folder held.
    """

    translated: list[Path]
    skipped: list[Path]
    failed: list[str]
    inputs: int


def folder_inputs(source: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """The images ``translate_folder`` would translate, checked without a model (so a caller can fail early).

    Args:
        source: the input folder; sub-folders are searched, hidden files and folders skipped.
        target: the output folder; when it lies inside ``source`` it is not searched.
        overwrite: whether outputs that exist would be replaced.

    Returns:
        the input files, sorted.

    Raises:
        BadInputError: ``source`` is missing or holds no images; ``target`` is a file or ``source`` itself; or
            ``target`` lies inside ``source``, holds pictures already and ``overwrite`` would replace them (they
            cannot be told from the input's own pictures).
    """
    source, target = Path(source), Path(target)
    if target.resolve() == source.resolve():  # every output would land beside its input, or replace it
        raise BadInputError(f"The output folder {target} is the input folder; write the translations elsewhere.")
    if target.exists() and not target.is_dir():
        raise BadInputError(f"The input is a folder, so the output must be a folder; {target} is a file.")
    files = pre.list_images(source, recursive=True, skip=[target])
    if source.resolve() in target.resolve().parents and target.is_dir():
        held = [p for p in target.rglob("*") if pre.is_image_file(p)]
        if held and overwrite:
            raise BadInputError(
                f"The output folder {target} lies inside the input folder and holds {len(held)} picture(s) already"
                f" (e.g. {min(held)}), which overwriting could replace; write elsewhere, or move them out first."
            )
        if held:
            logger.warning(
                "the output folder %s lies inside the input folder: its %d picture(s) are not read as inputs",
                target, len(held),
            )  # fmt: skip
    return files


def translate_folder(
    translator: Translator,
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    files: list[Path] | None = None,
    captions: str | os.PathLike | Mapping[str, object] | None = None,
    **options,
) -> FolderResult:
    """Translate every image under ``source`` into the same place under ``target``, as .png.

    Args:
        translator: a ``Translator``.
        source: the input folder (see ``folder_inputs``).
        target: the output folder (created as needed).
        batch_size: images per forward pass.
        overwrite: replace outputs that exist (otherwise they are kept and counted as skipped).
        progress: show a progress bar.
        files: the inputs, as ``folder_inputs(source, target, overwrite)`` listed them for a caller that checked
            early (None: listed here).
        captions: each image's own caption: a JSON file or a mapping {path inside ``source``: caption} (see
            ``captions.py``); ``prompt`` then captions only the images it does not name.
        **options: the rest of ``Translator.__call__``'s arguments (prompt, direction, r, seed, edges, ...), the
            same for every image.

    Returns:
        a ``FolderResult``; failures are listed there, not raised.

    Raises:
        BadInputError: the folders are unusable (see ``folder_inputs``), an option every image would refuse, or
            images without a usable caption in ``captions`` (all checked before any image is read).
    """
    source, target = Path(source), Path(target)
    checked = {k: v for k, v in options.items() if k in _CHECKED}
    if captions is not None and options.get("prompt") is None:  # captions are checked below: no default needed
        checked["prompt"] = []
    translator.check_options(batch_size=batch_size, **checked)
    files = folder_inputs(source, target, overwrite) if files is None else files
    prompts: dict[Path, str] = {}
    if captions is not None:
        named = "the captions given" if isinstance(captions, Mapping) else str(captions)
        table = captions if isinstance(captions, Mapping) else read_captions(captions)
        prompts = folder_captions(files, source, table, named, options.get("prompt"))
    result = FolderResult([], [], [], len(files))
    pending: list[tuple[Path, Path, object]] = []

    def flush() -> None:  # one batched call for the images gathered so far; on a bad one, each alone to find it
        own = {"prompt": [prompts[path] for path, _, _ in pending]} if prompts else {}
        try:
            outputs = translator([image for _, _, image in pending], batch_size=batch_size, **{**options, **own})
        except BadInputError:
            outputs = [None] * len(pending)
        for (path, out, image), output in zip(pending, outputs):
            alone = {**options, "prompt": prompts[path]} if prompts else options
            try:
                pre.save_image(output or translator(image, **alone), out, overwrite=overwrite)
                result.translated.append(out)
            except BadInputError as error:
                result.failed.append(str(error) if str(path) in str(error) else f"{path}: {error}")
        pending.clear()

    claimed: dict[Path, Path] = {}
    with logging_redirect_tqdm(loggers=[logger]):  # warnings (an animated file, say) above the bar, not in its line
        for path in tqdm(files, desc="translating", unit="img", disable=not progress):
            out = target / path.relative_to(source).with_suffix(".png")
            if out in claimed:  # a.jpg and a.png both become a.png: the second would overwrite the first
                result.failed.append(f"{path}: same output file {out} as {claimed[out]}; rename one of them.")
                continue
            claimed[out] = path
            if out.exists() and not overwrite:
                result.skipped.append(out)
                continue
            try:
                image = pre.load_image(path, max_pixels=translator.max_pixels)
            except BadInputError as error:
                result.failed.append(str(error))  # a bad file is reported; the rest of the folder is still translated
                continue
            pending.append((path, out, image))
            if len(pending) == batch_size:
                flush()
    flush()
    return result
