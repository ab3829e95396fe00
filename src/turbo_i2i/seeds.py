"""The seeds torch's random generators take, in a module without heavy imports so option parsing can check them."""

from __future__ import annotations

import operator

from .errors import BadInputError

SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes: any int64 or uint64


def check_seed(seed: object, name: str = "seed") -> int:
    """A seed as a plain int, or a clear error.

    Integers of any kind (Python, numpy, 0-d torch) are taken; bools and floats are refused. The int conversion comes
    first because ``x in range(...)`` tests anything but a plain int by stepping through the range (2**64 steps).

    Args:
        seed: the seed given.
        name: how messages name it ("seed", "--seed").

    Returns:
        The seed as an int.

    Raises:
        BadInputError: not an integer, or outside ``SEEDS``.
    """
    if isinstance(seed, bool):
        raise BadInputError(f"{name} must be an integer, got {seed!r}.")
    try:
        value = operator.index(seed)
    except TypeError:
        raise BadInputError(f"{name} must be an integer, got {seed!r} ({type(seed).__name__}).") from None
    if value not in SEEDS:
        raise BadInputError(f"{name} must be between {SEEDS.start} and {SEEDS.stop - 1}, got {value}.")
    return value
