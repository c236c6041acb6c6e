"""Tell quickly whether the Hugging Face Hub can be reached, so offline runs fail in one line.

Without this check the hub clients retry with back-off for half a minute per file and then
raise a long traceback.
"""
from __future__ import annotations

import socket
from urllib.parse import urlparse

from .errors import HubUnreachable


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within `timeout` seconds."""
    if endpoint is None:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, fix: str) -> None:
    """Raise HubUnreachable naming `what` was wanted and `fix`, when the hub is unreachable."""
    if not hub_reachable():
        raise HubUnreachable(f"Cannot reach the Hugging Face Hub to download {what}; {fix}")
