"""Small helpers for tests that start real processes on loopback."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float = 30.0):
    """`check()`'s result once it stops raising OSError or AssertionError."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return check()
        except (OSError, AssertionError) as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"not up after {timeout} s: {last}")
