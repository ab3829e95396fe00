"""Errors that the CLI turns into a one-paragraph message and an exit code instead of a traceback."""

import contextlib
from collections.abc import Iterator, Sequence

MAX_LISTED_PROBLEMS = 20


class TurboI2IError(Exception):
    """A failure the user can act on (missing weights, no network). The CLI exits with code 1."""

    exit_code = 1


class BadInputError(TurboI2IError, ValueError):
    """Bad user input: a missing or corrupt image, an unknown model name, a bad prompt. Exit code 2."""

    exit_code = 2


class CheckpointWriteError(TurboI2IError):
    """A training checkpoint or export could not be written (disk full, quota, I/O error). Exit code 1.

    Not bad input: the run's settings are fine and the previous checkpoint is intact; free space and resume.
    """


class TrainingDivergedError(TurboI2IError):
    """Training stopped after too many consecutive steps with a NaN/Inf loss or gradient. Exit code 1."""


def load_failure(error: Exception) -> str:
    """One line saying why a file could not be loaded, for our messages.

    For a pickle that ``torch.load(weights_only=True)`` refused, the object it refused, without torch's own advice to
    load the file again with ``weights_only=False`` (which would run whatever code the file holds).

    Args:
        error: what loading raised.

    Returns:
        e.g. "UnpicklingError: a pickle holding more than tensors (Unsupported operand 149)".
    """
    text = str(error)
    if text.startswith("Weights only load failed"):
        # torch's message opens with the advice; what it refused follows, after "WeightsUnpickler error:" in most forms
        body = text.split("Check the documentation", 1)[0]
        marker = "WeightsUnpickler error:"
        body = body.split(marker, 1)[1] if marker in body else "\n".join(body.splitlines()[1:])
        lines = [line.strip() for line in body.splitlines() if line.strip() and "weights_only" not in line]
        detail = lines[0].split(". Please", 1)[0].rstrip(".") if lines else "refused"
        return f"{type(error).__name__}: a pickle holding more than tensors ({detail})"
    first = (text or "-").splitlines()[0]
    # other loaders (timm) pass torch's refusal on with the same advice: keep what precedes it
    first = first.split("If this checkpoint is trusted")[0].split("retry with weights_only=False")[0].strip()
    return f"{type(error).__name__}: {first or 'refused'}"


def format_problems(where: str, problems: Sequence[str], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """The message listing every problem found in the user's files, so one run shows them all.

    Args:
        where: what the problems are in, e.g. "in the dataset my_data" or "with the evaluation files".
        problems: every problem found.
        limit: how many to list; the rest are counted.

    Returns:
        "N problems <where>:", then up to ``limit`` problems one per line, then "... and K more".
    """
    noun = "problem" if len(problems) == 1 else "problems"
    lines = [f"{len(problems)} {noun} {where}:"]
    lines += [f"  - {problem}" for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


@contextlib.contextmanager
def with_hint(hint: str | None) -> Iterator[None]:
    """Add a front end's own advice (its option names) to a loader's missing-weights paragraph, which names only
    the Python arguments: the same loaders serve ``turbo-i2i eval``, ``turbo-i2i train`` and Python code.

    Args:
        hint: the sentence to add (None: nothing). Bad input passes through unchanged.
    """
    try:
        yield
    except BadInputError:
        raise
    except TurboI2IError as error:
        if hint is None:
            raise
        raise TurboI2IError(f"{error} {hint}") from error
