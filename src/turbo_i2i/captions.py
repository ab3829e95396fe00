"""Caption files: one JSON object mapping the files of a folder to their captions.

The paired data sets' ``test_prompts.json`` is one (``{"0001.png": "a photo of ..."}``), so a test split can be
translated with its own captions (``turbo-i2i translate --prompts``) and the outputs scored against them
(``turbo-i2i eval --prompts``). A file is looked up by its path inside the folder (see ``CaptionTable``), so one
table serves inputs, outputs and references whose endings differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from .errors import BadInputError

# files named in one message, at most; the rest are counted
NAMED = 5


def read_captions(path: str | os.PathLike) -> dict[str, object]:
    """Read a caption file.

    Args:
        path: a JSON file holding one object {file name: caption}.

    Returns:
        the object as read (the captions are checked where they are used).

    Raises:
        BadInputError: the file is missing, a folder, not JSON, or not one JSON object.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"Prompts file '{path}' is a folder; pass a JSON file mapping file names to captions.")
    if not path.is_file():
        raise BadInputError(f"Prompts file '{path}' does not exist; pass a JSON file mapping file names to captions.")
    try:
        captions = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(f"Prompts file '{path}' is not readable JSON ({error}); fix or re-export it.") from error
    if not isinstance(captions, dict):
        raise BadInputError(f"Prompts file '{path}' must hold one JSON object mapping file names to captions.")
    return captions


class CaptionTable:
    """A caption file's table, looked up by paths inside folders.

    A path is looked for as it is (``day/0001.png``), then without its extension (``day/0001``), then as a key that
    names it with another extension (``day/0001.jpg``: the input of an output written as .png).

    Args:
        captions: {path: caption}, as ``read_captions`` returns it (``./`` prefixes are ignored).
    """

    def __init__(self, captions: Mapping[str, object]):
        self.exact = {PurePosixPath(key).as_posix(): value for key, value in captions.items()}
        self.by_stem: dict[str, object] = {}
        for key, value in self.exact.items():
            self.by_stem.setdefault(_stem(key), value)

    def find(self, paths: Sequence[str]) -> object:
        """The caption of the first of ``paths`` (posix paths inside their folders) the table names, or None."""
        for path in paths:
            if path in self.exact:
                return self.exact[path]
        for path in paths:
            if _stem(path) in self.exact:
                return self.exact[_stem(path)]
        for path in paths:
            if _stem(path) in self.by_stem:
                return self.by_stem[_stem(path)]
        return None


def _stem(path: str) -> str:
    """A posix path without its extension."""
    parsed = PurePosixPath(path)
    return (parsed.with_suffix("") if parsed.suffix else parsed).as_posix()


def folder_captions(
    files: Sequence[Path], folder: Path, captions: Mapping[str, object], source: str, fallback: str | None = None
) -> dict[Path, str]:
    """Each file's caption, every file checked at once, so a bad table is refused before a model loads.

    Args:
        files: the images, inside ``folder``.
        folder: the folder the keys are paths in.
        captions: the table (``read_captions``).
        source: how the table is named in messages (its file).
        fallback: the caption of files the table does not name (None: such files are refused).

    Returns:
        file -> caption.

    Raises:
        BadInputError: naming the files without a caption (and no fallback) and those whose caption is not a
            non-empty string.
    """
    table = CaptionTable(captions)
    found: dict[Path, str] = {}
    missing, unusable = [], []
    for path in files:
        inside = path.relative_to(folder).as_posix()
        caption = table.find([inside])
        if caption is None and fallback is not None:
            caption = fallback
        if caption is None:
            missing.append(inside)
        elif not isinstance(caption, str) or not caption.strip():
            unusable.append(f"{inside} ({json.dumps(caption)})")
        else:
            found[path] = caption
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of {len(files)} file(s) have no caption in {source}: {_some(missing)} (keys are paths"
            f" inside {folder}, e.g. {json.dumps(missing[0])}); add them, or pass"
            " a prompt (--prompt) for the files it does not name"
        )
    if unusable:
        problems.append(f"captions in {source} that are not non-empty text: {_some(unusable)}")
    if problems:
        raise BadInputError("; ".join(problems) + ".")
    return found


def _some(names: list[str]) -> str:
    """The first few names, and how many more there are."""
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return ", ".join(names[:NAMED]) + more
