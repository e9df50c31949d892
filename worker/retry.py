"""What the slide and training tasks share: this process's name in a claimed row, and retry backoff."""

from __future__ import annotations

import os
import socket

MAX_BACKOFF_S = 60

__all__ = ["MAX_BACKOFF_S", "backoff_s", "worker_name"]


def worker_name() -> str:
    """host/pid of this process, as recorded in the job row (the pid names the process to signal)."""
    return f"{socket.gethostname()}/{os.getpid()}"


def backoff_s(retries: int) -> int:
    """Seconds before retry number `retries` + 1: 1, 2, 4, 8... capped."""
    return min(2**retries, MAX_BACKOFF_S)
