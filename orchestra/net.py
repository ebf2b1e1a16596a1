"""Which addresses are this machine's own: what may travel in clear text
(a token) and what a server may listen on without exposing a job."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_private_channel(url: str) -> bool:
    """Whether a secret may be sent to `url`: over https, or over http to
    this machine (e.g. through `kubectl port-forward` or `ssh -L`)."""
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or ""))
