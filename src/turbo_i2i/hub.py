"""Where the Hugging Face hub cache is and whether downloads are off, read when asked.

huggingface_hub reads ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` once, on import; a notebook that sets them
later would get one answer from our loaders and another from the hub's. Every loader here asks these functions and
passes the answer on explicitly (``local_files_only=``, ``cache_dir=``), so all of them follow the environment as it is
now.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}

logger = logging.getLogger("turbo_i2i")


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


def download_first(repo_id: str, filenames: Sequence[str], local_files_only: bool) -> tuple[str | None, str, str]:
    """The first of ``filenames`` that the hub repo ``repo_id`` has, from the cache or downloaded into it.

    An unreachable hub (downloads on, no network) is asked nothing (see ``hub_reachable``): the cache is read at once.

    Args:
        repo_id: e.g. "timm/vit_base_patch8_224.dino".
        filenames: the candidates, preferred first.
        local_files_only: never download.

    Returns:
        (the local path, or None when none was found; where they were looked for and why none was found, for the
        caller's message).
    """
    from huggingface_hub import hf_hub_download

    from .errors import load_failure

    unreachable = not local_files_only and not hub_reachable()
    if unreachable:
        logger.warning("The Hugging Face hub cannot be reached; looking for %s in the local cache only.", repo_id)
    cache, error, cache_only = hub_cache(), None, local_files_only or unreachable
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=cache_only), "", ""
        except Exception as e:  # every hub failure (offline, missing file, HTTP) means: try the next candidate
            error = e
    looked_for = f"as {' or '.join(filenames)} of the Hugging Face hub repo {repo_id!r} in the cache {cache}"
    if local_files_only:
        reason = "not in the cache and offline"
    elif unreachable:
        reason = "not in the cache, and the hub cannot be reached"
    else:
        looked_for += " and on the hub"
        reason = load_failure(error)
    return None, looked_for, reason


def download_hint(repo_id: str) -> str:
    """How to put a hub repo's files where ``download_first`` finds them without a network."""
    return (
        f"run `hf download {repo_id}` once on a machine with a network and copy the cache, or set HF_HOME to a"
        " cache that holds it"
    )
