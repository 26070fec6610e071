"""Helpers shared by the live Serve tests."""

from __future__ import annotations

import socket

GOOD = {"instances": [[0.5] * 64]}
"""A valid /predict body for the 8x8 test models."""


def free_port() -> int:
    """A loopback port nothing listens on now (for Serve's HTTP proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
