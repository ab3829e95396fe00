"""Errors that the CLI turns into a one-paragraph message and an exit code instead of a traceback."""


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
