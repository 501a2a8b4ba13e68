"""Is the model hub reachable? Asked once, with a short timeout, so offline machines fail fast."""

from __future__ import annotations

import functools
import os
import socket


def looks_like_path(name: str) -> bool:
    """A name the user meant as a local path rather than a hub name ('org/name'): it starts with / . or ~, has
    more than one '/', or a backslash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
