"""Where the Hugging Face hub cache is and whether downloads are off, read when asked.

huggingface_hub reads ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` once, on import; a notebook that sets them
later would get one answer from our loaders and another from the hub's. Every loader here asks these functions and
passes the answer on explicitly (``local_files_only=``, ``cache_dir=``), so all of them follow the environment as it is
now.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether downloads are off.

    Returns:
        ``HF_HUB_OFFLINE`` as set now, else huggingface_hub's value from import time.
    """
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in _TRUE


def hub_cache() -> Path:
    """The Hugging Face hub cache folder.

    Returns:
        ``HF_HUB_CACHE``, else ``HF_HOME/hub``, as set now; else huggingface_hub's folder from import time.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
