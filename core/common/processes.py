"""Processes on this machine: whether one still runs, as a worker's liveness checks need it."""

from __future__ import annotations

import os
from pathlib import Path


def pid_running(pid: int, parent_pid: int | None = None) -> bool:
    """Whether process `pid` runs on this machine: it exists and is not a zombie (exited, not yet reaped);
    with `parent_pid`, also that it is still that process's child (a pool process whose worker was killed
    is re-parented: an orphan that will never report back). Where /proc cannot tell, existing is enough."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:2]
    except (OSError, ValueError):  # no /proc (not Linux), or it went meanwhile
        return True
    if state == "Z":
        return False
    return parent_pid is None or int(ppid) == parent_pid
