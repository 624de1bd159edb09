"""Is the Hugging Face Hub usable from here: the offline switch, and a quick reachability check. Models
(model/loading.py), datasets (data/hub.py) and `prefopt export --push-to-hub` ask the same question."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set, read now (huggingface_hub reads it once, at its import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off") or bool(
        constants.HF_HUB_OFFLINE
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP check, so offline machines fail in seconds instead of after long HTTP retries."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False
