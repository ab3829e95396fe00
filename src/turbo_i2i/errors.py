"""Errors that the CLI turns into a one-paragraph message and an exit code instead of a traceback."""


class TurboI2IError(Exception):
    """A failure the user can act on (missing weights, no network). The CLI exits with code 1."""

    exit_code = 1


class BadInputError(TurboI2IError, ValueError):
    """Bad user input: a missing or corrupt image, an unknown model name, a bad prompt. Exit code 2."""

    exit_code = 2
