"""The heartbeat of a process that takes jobs: its row in the workers table, written every
BLASTQ_HEARTBEAT_S from a daemon thread (core.adapters.db.workers), and marked stopped on a clean exit.

A prefork worker's pool processes each beat (they claim the jobs, under their own host/pid); with the solo
pool the worker itself does. A database that does not answer is logged and tried again at the next beat:
a heartbeat never stops the slide in hand.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from importlib.metadata import version

from blastq.core.adapters import beat, forget_workers, stop_beating
from blastq.worker.retry import worker_name

log = logging.getLogger(__name__)


class Heartbeat:
    """Beats for this process (worker_name()) until stopped; `db` makes or returns the database engine."""

    def __init__(
        self, db: Callable[[], object], queues: list[str], interval_s: float, parent: str | None = None
    ):
        self.db, self.queues, self.interval_s, self.parent = db, queues, interval_s, parent
        self.name = worker_name()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> Heartbeat:
        """Beat now (so the row exists before the first job is claimed), then every interval."""
        try:
            forget_workers(self.db())
        except Exception as exc:  # noqa: BLE001 - housekeeping; the beat below says what is wrong
            log.debug("could not forget old worker rows: %s", exc)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="blastq-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def _beat(self) -> None:
        try:
            beat(
                self.db(),
                self.name,
                host=socket.gethostname(),
                pid=os.getpid(),
                queues=",".join(self.queues),
                version=version("blastq"),
                parent=self.parent,
            )
        except Exception as exc:  # noqa: BLE001 - the next beat tries again
            if not self._failing:
                log.warning("worker %s: heartbeat not recorded: %s", self.name, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("worker %s: heartbeat recorded again", self.name)
            self._failing = False

    def stop(self) -> None:
        """Stop beating and mark this worker stopped (best effort: the database may be gone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            stop_beating(self.db(), self.name)
        except Exception as exc:  # noqa: BLE001
            log.warning("worker %s: could not record its stop: %s", self.name, exc)
