"""What the slide and training tasks share: this process's name in a claimed row, and how they retry.

A transient fault (TransientError: the database or the store did not answer) is retried by Celery itself
(`autoretry_for`), backing off 1, 2, 4... seconds up to MAX_BACKOFF_S with full jitter (`retry_jitter`:
a random wait up to that bound), so workers that met the same outage do not all come back at once. The
task body lets the error through while retries are left and fails the row when they are spent."""

from __future__ import annotations

import os
import socket

from blastq.core.common import TransientError

MAX_BACKOFF_S = 60

__all__ = ["MAX_BACKOFF_S", "RETRY_POLICY", "worker_name"]

RETRY_POLICY = {
    "autoretry_for": (TransientError,),
    "retry_backoff": 1,
    "retry_backoff_max": MAX_BACKOFF_S,
    "retry_jitter": True,
}


def worker_name() -> str:
    """host/pid of this process, as recorded in the job row (the pid names the process to signal)."""
    return f"{socket.gethostname()}/{os.getpid()}"
