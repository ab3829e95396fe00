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


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub answers one request now, through the session (and proxies) huggingface_hub uses.

    Without a network, huggingface_hub retries every file it is asked for with growing waits: minutes of "Retrying
    in 8s" lines before the loader's own message. One request without retries tells the loaders to read the local
    cache instead.

    Args:
        timeout: seconds to wait for the answer.

    Returns:
        True when it answered (whatever the status), False on any failure to connect.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # the HTTP client's own error types (name resolution, refused, timeout, proxy)
        return False
    return True
