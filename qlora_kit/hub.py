"""Is the Hugging Face hub within reach, and is a repo's file already in the local cache?

Asked before transformers or datasets go to the network, so that an uncached id offline is one
line, not minutes of retries and a page of warnings.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_ON = ("1", "ON", "YES", "TRUE")


def offline_reason(flags: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> str | None:
    """Why the hub cannot be reached (an offline flag, or no connection to it), or None if it can."""
    for name in flags:
        if os.environ.get(name, "").upper() in _ON:
            return f"offline ({name} is set)"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    if not reachable(host, endpoint.port or (80 if endpoint.scheme == "http" else 443)):
        return f"{host} is not reachable (offline?)"
    return None


def reachable(host: str, port: int = 443, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection within ``timeout_s``; DNS is bounded too (it runs in a daemon thread)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(ok)


def cached(repo_id: str, filename: str, revision: str | None = None) -> bool:
    """Whether ``filename`` of model repo ``repo_id`` is in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except Exception:  # an id the hub would reject: let the loader say so
        return False
