"""The scanner-folder watcher: submit each slide a scanner finishes writing, once, across restarts.

It polls instead of using inotify, which network shares (where scanners write) do not deliver. A file is
complete when its size and mtime have not changed for `watch_settle_s`, or at once when a sidecar
marker sits beside it (`slide.png.done`, `slide.done`, or `.ready`). Before it is submitted, each file
version (root, relpath, size, mtime_ns) is claimed by inserting its row in the database ledger: the
unique key is the claim, so two watchers on one folder, or a watcher and its restarted self, submit it
once. A file rewritten later is a new version and is submitted again. Submission is `blastq submit`'s
own function, so uploads, job rows and reuse of existing results are the same.

With `samples`, each sub-folder is a sample (one patient): the images in WATCHED/<name>/ are submitted
as images of sample <name>, whose cells are pooled into one verdict as their jobs succeed.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from blastq.core.adapters import (
    Settings,
    claim_watched_file,
    connect,
    job_status,
    jobs_for_file,
    record_watched_file,
    release_watched_file,
    watched_files,
)
from blastq.core.cells import check_sample_name
from blastq.core.common import BlastqError, InvalidConfig, ModelInvalid, ModelNotFound, TransientError
from blastq.worker.celery_app import BlastqCelery, make_app
from blastq.worker.submit import IMAGE_SUFFIXES, SubmitOutcome, SubmittedFile, send_job, submit

log = logging.getLogger(__name__)

MARKER_SUFFIXES = (".done", ".ready")
TEMPORARY_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial")
# Files per submit() call, each call one batch: a stop request waits for one chunk at most.
SUBMIT_CHUNK = 8
BATCH_NAME_CHARS = 200  # the batches.name column

SubmitFiles = Callable[..., SubmitOutcome]  # submit()'s signature; tests wrap it to inject faults


@dataclass(frozen=True)
class WatchEvent:
    """What the watcher did with one file: submitted, rejected for good, or retry (a transient fault)."""

    path: str  # the file under the watched folder (the folder itself for a fault cutting a scan short)
    state: str  # "submitted", "rejected" or "retry"
    job_id: str | None = None
    reason: str | None = None  # why rejected or retried; for submitted, a warning (message not sent)
    reused_result_id: int | None = None  # the content was processed before: the job points at it


@dataclass(frozen=True)
class ScanReport:
    """One scan: what it did, and the images still settling."""

    events: tuple[WatchEvent, ...] = ()
    pending: tuple[str, ...] = ()  # relpaths of images not yet unchanged for the settle time
    next_ready_at: float | None = None  # clock time the first of them may be complete

    @property
    def submitted(self) -> tuple[WatchEvent, ...]:
        return tuple(e for e in self.events if e.state == "submitted")

    @property
    def rejected(self) -> tuple[WatchEvent, ...]:
        return tuple(e for e in self.events if e.state == "rejected")

    @property
    def retrying(self) -> tuple[WatchEvent, ...]:
        return tuple(e for e in self.events if e.state == "retry")


@dataclass(frozen=True)
class WatchSummary:
    """A whole run: files submitted and rejected, and retries still pending after the last scan."""

    submitted: int
    rejected: int
    retrying: int


def is_candidate(name: str) -> bool:
    """An image name a scanner leaves when done: not hidden, temporary, partial or a marker."""
    lower = name.lower()
    if name.startswith((".", "~")) or lower.endswith(TEMPORARY_SUFFIXES + MARKER_SUFFIXES):
        return False
    return lower.endswith(IMAGE_SUFFIXES)


def log_event(event: WatchEvent) -> None:
    """The default report: one log line per event."""
    if event.state == "submitted":
        log.info("submitted %s: job %s", event.path, event.job_id)
        if event.reason:
            log.warning("%s: %s", event.path, event.reason)
    elif event.state == "rejected":
        log.warning("rejected %s: %s", event.path, event.reason)
    else:
        log.warning("will retry %s: %s", event.path, event.reason)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM set `stop` (the file in hand is finished); a second one interrupts.

    Only the main thread can take signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, _frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("%s: stopping after the file in hand", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass(frozen=True)
class _Listed:
    """An image in the folder as one scan saw it."""

    relpath: str  # POSIX, relative to the root
    size: int
    mtime_ns: int
    marker: bool  # a .done/.ready sidecar is beside it
    outside: str | None = None  # set for a symlink leaving the root: why it is rejected

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.relpath, self.size, self.mtime_ns)


@dataclass(frozen=True)
class _Claim:
    """A file version this watcher holds in the ledger (state seen) and has to settle."""

    entry_id: int
    relpath: str
    key: tuple[str, int, int]
    since: datetime  # a job made for this file since then belongs to this claim
    taken_over: bool  # from a watcher that died holding it: it may have made the job already


class Watcher:
    """Watches one folder: `scan_once()` lists it, submits the files now complete, and says what it did.

    `clock` (monotonic seconds) times the settling; `sleep` waits between scans in `run()` (by
    default it wakes at once when `stop` is set); `submit_files` is `blastq submit`'s function and
    `app` the Celery app it sends with (by default one made from `settings`, closed by `close()`).
    `samples`: the first-level sub-folders are entered, and their images submitted as one sample each
    (named after the sub-folder; deeper folders too with `recursive`, in their top folder's sample).
    """

    def __init__(
        self,
        settings: Settings,
        root: str | Path,
        *,
        batch_name: str | None = None,
        recursive: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        stop: threading.Event | None = None,
        submit_files: SubmitFiles = submit,
        app: BlastqCelery | None = None,
        samples: bool = False,
    ):
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise InvalidConfig(f"not a folder: {folder}")
        if batch_name is not None and not 0 < len(batch_name) <= BATCH_NAME_CHARS:
            raise InvalidConfig(f"a batch name has 1 to {BATCH_NAME_CHARS} characters, got {len(batch_name)}")
        self.settings = settings
        self.root = folder.resolve()
        self.batch_name = batch_name
        self._batch_id: str | None = None
        self.recursive = recursive
        self.samples = samples
        self.clock = clock
        self.stop = stop or threading.Event()
        self._sleep = sleep or self.stop.wait
        self._submit_files = submit_files
        self._claim_timeout = timedelta(seconds=settings.watch_claim_timeout_s)
        self._db = None
        self._celery = app
        self._own_app = app is None
        self._stable_since: dict[str, tuple[int, int, float]] = {}  # relpath -> (size, mtime_ns, since)
        self._looked_up: set[tuple[str, int, int]] = set()  # versions already looked for in the ledger
        self._done: set[tuple[str, int, int]] = set()  # versions settled in the ledger, by anyone
        self._orphans: list[_Claim] = []  # claims a fault left unsettled: settled first next scan
        self._unsent: dict[str, str] = {}  # job id -> path: row written, message refused by the broker
        self._skipped: set[str] = set()  # relpaths logged as impossible to handle

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Settle what a fault left claimed (when the database answers), then let go of connections."""
        if self._orphans and self._db is not None:
            with suppress(TransientError):
                self._settle_orphans(self._db, [])
        if self._db is not None:
            self._db.dispose()
            self._db = None
        if self._celery is not None and self._own_app:
            self._celery.close()
            self._celery = None

    # --- the loop ---------------------------------------------------------------------------------

    def run(self, *, once: bool = False, report: Callable[[WatchEvent], None] = log_event) -> WatchSummary:
        """Scan now, then every `watch_interval_s` until `stop` is set (a scan in hand is finished).

        `once`: after the first scan, wait only for the images then settling (at most the settle
        time), then return.
        """
        submitted = rejected = 0
        deadline = None
        while True:
            now = self.clock()
            scan = self.scan_once(now)
            for event in scan.events:
                report(event)
            submitted += len(scan.submitted)
            rejected += len(scan.rejected)
            if self.stop.is_set():
                break
            if once:
                deadline = now + self.settings.watch_settle_s if deadline is None else deadline
                if scan.next_ready_at is None or scan.next_ready_at > deadline:
                    break
                self._sleep(max(scan.next_ready_at - self.clock(), 0.0))
            else:
                self._sleep(self.settings.watch_interval_s)
            if self.stop.is_set():
                break
        return WatchSummary(submitted, rejected, len(scan.retrying))

    def scan_once(self, now: float | None = None) -> ScanReport:
        """List the folder, submit the files complete at `now` (clock seconds), report what happened.

        A transient fault (database, store, broker) cuts the scan short with a retry event; the next
        scan carries on where it stopped.
        """
        now = self.clock() if now is None else now
        events: list[WatchEvent] = []
        listed: dict[str, _Listed] = {}
        try:
            listed = self._list()
            self._track(listed, now)
            db = self._connect()
            self._settle_orphans(db, events)
            self._resend(db, events)
            self._look_up(db, listed)
            self._reject_outside(db, listed, events)
            ready = sorted(
                (f for f in listed.values() if f.outside is None and self._ready(f, now)),
                key=lambda f: (f.mtime_ns, f.relpath),
            )
            for start in range(0, len(ready), SUBMIT_CHUNK):
                if start and self.stop.is_set():
                    break
                self._submit(db, ready[start : start + SUBMIT_CHUNK], events)
        except TransientError as exc:
            events.append(WatchEvent(str(self.root), "retry", reason=_one_line(exc)))
        settling = sorted(
            f.relpath
            for f in listed.values()
            if f.outside is None and f.key not in self._done and not self._ready(f, now)
        )
        ready_at = [self._stable_since[relpath][2] + self.settings.watch_settle_s for relpath in settling]
        return ScanReport(tuple(events), tuple(settling), min(ready_at, default=None))

    # --- listing and settling ---------------------------------------------------------------------

    def _list(self) -> dict[str, _Listed]:
        found: dict[str, _Listed] = {}
        self._list_folder(self.root, "", found)
        return found

    def _list_folder(self, folder: Path, prefix: str, found: dict[str, _Listed]) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            if folder == self.root:  # an unmounted share comes back: retry, do not stop
                raise TransientError(f"cannot list {folder}: {exc.strerror or exc}") from exc
            log.warning("skipping %s: %s", folder, exc.strerror or exc)
            return
        names = {e.name for e in entries}
        for entry in entries:
            relpath = prefix + entry.name
            if not _utf8(relpath):
                self._skip_once(relpath, "its name is not UTF-8, which the database cannot store")
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    enter = self.recursive or (self.samples and folder == self.root)
                    if enter and not entry.name.startswith(".") and self._sample_folder_ok(folder, relpath):
                        self._list_folder(Path(entry.path), relpath + "/", found)
                    continue
                if not is_candidate(entry.name):
                    continue
                stem = entry.name.rsplit(".", 1)[0]
                marker = any(f"{n}{s}" in names for n in (entry.name, stem) for s in MARKER_SUFFIXES)
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if not target.is_relative_to(self.root):
                        link = entry.stat(follow_symlinks=False)
                        why = f"symlink to {target}, outside the watched folder {self.root}"
                        found[relpath] = _Listed(relpath, link.st_size, link.st_mtime_ns, marker, why)
                        continue
                info = entry.stat(follow_symlinks=True)
            except (OSError, RuntimeError):  # gone while listed, or a symlink loop
                continue
            if stat.S_ISREG(info.st_mode):
                found[relpath] = _Listed(relpath, info.st_size, info.st_mtime_ns, marker)

    def _track(self, listed: dict[str, _Listed], now: float) -> None:
        """Restart the settle clock of every file whose size or mtime changed; forget vanished files."""
        for relpath, f in listed.items():
            known = self._stable_since.get(relpath)
            if known is None or known[:2] != (f.size, f.mtime_ns):
                self._stable_since[relpath] = (f.size, f.mtime_ns, now)
        for relpath in self._stable_since.keys() - listed.keys():
            del self._stable_since[relpath]
        present = {f.key for f in listed.values()}
        self._done &= present
        self._looked_up &= present

    def _ready(self, f: _Listed, now: float) -> bool:
        if f.key in self._done:
            return False
        return f.marker or now - self._stable_since[f.relpath][2] >= self.settings.watch_settle_s

    def _look_up(self, db, listed: dict[str, _Listed]) -> None:
        """Versions already settled in the ledger (before a restart, or by another watcher) are done."""
        new = {f.key: f for f in listed.values() if f.key not in self._looked_up}
        if not new:
            return
        for entry in watched_files(db, str(self.root), {f.relpath for f in new.values()}):
            key = (entry.relpath, entry.size, entry.mtime_ns)
            if key in new and entry.state != "seen":
                self._done.add(key)
        self._looked_up |= new.keys()

    def _unchanged(self, f: _Listed) -> bool:
        try:
            info = (self.root / f.relpath).stat()
        except OSError:
            return False
        return (info.st_size, info.st_mtime_ns) == (f.size, f.mtime_ns)

    # --- the ledger and submission ----------------------------------------------------------------

    def _claim(self, db, f: _Listed) -> _Claim | None:
        since = datetime.now(UTC)
        try:
            entry, claimed = claim_watched_file(
                db, str(self.root), f.relpath, f.size, f.mtime_ns, stale_after=self._claim_timeout
            )
        except TransientError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a path longer than the ledger's column
            self._skip_once(f.relpath, f"the ledger cannot record it ({_one_line(exc)})")
            return None
        if not claimed:
            if entry is not None and entry.state != "seen":
                self._done.add(f.key)
            return None  # or another watcher is submitting it right now
        # A taken-over claim comes back with its dead owner's time: look for its job from then on.
        taken_over = entry.updated_at < since
        return _Claim(entry.id, f.relpath, f.key, min(since, entry.updated_at), taken_over)

    def _reject_outside(self, db, listed: dict[str, _Listed], events: list[WatchEvent]) -> None:
        for f in listed.values():
            if f.outside is None or f.key in self._done:
                continue
            claim = self._claim(db, f)
            if claim is None:
                continue
            try:
                record_watched_file(db, claim.entry_id, "rejected", reason=f.outside)
            except TransientError:
                self._orphans.append(claim)
                raise
            self._done.add(f.key)
            events.append(WatchEvent(self._path(f.relpath), "rejected", reason=f.outside))

    def _submit(self, db, files: Sequence[_Listed], events: list[WatchEvent]) -> None:
        claims: list[_Claim] = []
        try:
            for f in files:
                if not self._unchanged(f):
                    continue  # written to again since it was listed: the next scan sees the new version
                if (claim := self._claim(db, f)) is None:
                    continue
                if claim.taken_over and self._adopt_job(db, claim, events):
                    continue
                claims.append(claim)
        except TransientError:
            self._orphans.extend(claims)
            raise
        groups: dict[str | None, list[_Claim]] = {}  # one submit() per sample
        for claim in claims:
            groups.setdefault(self._sample_of(claim.relpath), []).append(claim)
        for i, group in enumerate(groups.values()):
            try:
                self._submit_claims(db, group, events)
            except Exception:  # what _submit_claims lets out: the other groups' claims stay to settle
                self._orphans.extend(c for later in list(groups.values())[i + 1 :] for c in later)
                raise

    def _submit_claims(self, db, claims: list[_Claim], events: list[WatchEvent]) -> None:
        paths = [self._path(c.relpath) for c in claims]
        sample = self._sample_of(claims[0].relpath)
        # Passed only when set: submit_files may be a wrapper with submit()'s older signature.
        extra = {"sample": sample} if sample is not None else {}
        try:
            outcome = self._submit_files(
                self.settings,
                paths,
                batch_name=self._batch_name(),
                batch_id=self._batch_id,
                app=self._app(),
                **extra,
            )
        except (ModelNotFound, ModelInvalid, InvalidConfig):  # no file can be submitted: stop, and say why
            self._orphans.extend(claims)
            raise
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the watcher
            self._recover(db, claims, exc, events)
            return
        self._batch_id = self._batch_id or outcome.batch_id  # one batch per run, not one per scan
        by_path = {j.path: j for j in outcome.jobs}
        for i, claim in enumerate(claims):
            try:
                self._settle(db, claim, by_path.get(paths[i]), events)
            except TransientError:
                self._orphans.extend(claims[i:])
                raise

    def _settle(self, db, claim: _Claim, outcome: SubmittedFile | None, events: list[WatchEvent]) -> None:
        path = self._path(claim.relpath)
        if outcome is None:
            # submit() takes each file once: this one was another name (a symlink) of a file in
            # the same call. Submitted alone on the next scan.
            release_watched_file(db, claim.entry_id)
        elif outcome.job_id is None:
            reason = outcome.reason or "not submitted"
            record_watched_file(db, claim.entry_id, "rejected", reason=reason)
            self._done.add(claim.key)
            events.append(WatchEvent(path, "rejected", reason=reason))
        else:
            job = job_status(db, outcome.job_id)
            sha256 = job.sha256 if job is not None else None
            record_watched_file(db, claim.entry_id, "submitted", job_id=outcome.job_id, sha256=sha256)
            self._done.add(claim.key)
            warning = None
            if outcome.error:  # the row is written, the broker did not take the message
                self._unsent[outcome.job_id] = path
                warning = f"{outcome.reason}; sent again on the next scan"
            events.append(WatchEvent(path, "submitted", outcome.job_id, warning, outcome.reused_result_id))

    def _recover(self, db, claims: list[_Claim], exc: Exception, events: list[WatchEvent]) -> None:
        """After submit() raised: settle the claims it made jobs for; retry or isolate the rest."""
        reason = _one_line(exc)
        if not isinstance(exc, BlastqError):
            log.debug("submit of %d file(s) raised", len(claims), exc_info=exc)
        unresolved: list[_Claim] = []
        for i, claim in enumerate(claims):
            try:
                if self._adopt_job(db, claim, events):
                    continue
                if isinstance(exc, TransientError):
                    release_watched_file(db, claim.entry_id)
                    events.append(WatchEvent(self._path(claim.relpath), "retry", reason=reason))
                else:
                    unresolved.append(claim)
            except TransientError:
                self._orphans.extend(unresolved + claims[i:])
                raise
        if len(claims) == 1 and unresolved:
            (claim,) = unresolved
            record_watched_file(db, claim.entry_id, "rejected", reason=reason)
            self._done.add(claim.key)
            events.append(WatchEvent(self._path(claim.relpath), "rejected", reason=reason))
            return
        for i, claim in enumerate(unresolved):  # one at a time, so only the bad file is rejected
            try:
                self._submit_claims(db, [claim], events)
            except TransientError:
                self._orphans.extend(unresolved[i + 1 :])
                raise

    def _adopt_job(self, db, claim: _Claim, events: list[WatchEvent]) -> bool:
        """Settle the claim as submitted if a job was made for it (by a call that then failed)."""
        jobs = jobs_for_file(db, self._path(claim.relpath), claim.since)
        if not jobs:
            return False
        record_watched_file(db, claim.entry_id, "submitted", job_id=jobs[0].id, sha256=jobs[0].sha256)
        self._done.add(claim.key)
        events.append(WatchEvent(self._path(claim.relpath), "submitted", jobs[0].id))
        return True

    def _settle_orphans(self, db, events: list[WatchEvent]) -> None:
        orphans, self._orphans = self._orphans, []
        for i, claim in enumerate(orphans):
            try:
                if not self._adopt_job(db, claim, events):
                    release_watched_file(db, claim.entry_id)  # claimed again if still complete
            except TransientError:
                self._orphans.extend(orphans[i:])
                raise

    def _resend(self, db, events: list[WatchEvent]) -> None:
        for job_id, path in list(self._unsent.items()):
            job = job_status(db, job_id)
            if job is None or job.state != "queued":
                del self._unsent[job_id]  # a worker has it (requeue sent it), or it is gone
                continue
            try:
                send_job(self._app(), job_id)
            except Exception as exc:  # noqa: BLE001 - the broker is still away: next scan
                events.append(
                    WatchEvent(path, "retry", job_id, f"the broker did not take it: {_one_line(exc)}")
                )
                return
            del self._unsent[job_id]
            log.info("sent job %s for %s", job_id, path)

    # --- plumbing -----------------------------------------------------------------------------------

    def _connect(self):
        if self._db is None:
            self._db = connect(self.settings.database_url.get_secret_value())
        return self._db

    def _app(self):
        if self._celery is None:
            self._celery = make_app(self.settings)
        return self._celery

    def _skip_once(self, relpath: str, why: str) -> None:
        """Log a file the watcher cannot handle once per run, not once per scan."""
        if relpath not in self._skipped:
            self._skipped.add(relpath)
            log.warning("skipping %s: %s", self.root / relpath, why)

    def _path(self, relpath: str) -> str:
        return str(self.root / relpath)

    def _sample_of(self, relpath: str) -> str | None:
        """The sample of a file: its top sub-folder's name (with `samples`), else none."""
        return relpath.split("/", 1)[0] if self.samples and "/" in relpath else None

    def _sample_folder_ok(self, folder: Path, relpath: str) -> bool:
        """A top sub-folder entered as a sample needs a name a sample can have."""
        if not self.samples or folder != self.root:
            return True
        try:
            check_sample_name(relpath)
        except InvalidConfig as exc:
            self._skip_once(relpath, str(exc))
            return False
        return True

    def _batch_name(self) -> str:
        if self.batch_name:
            return self.batch_name
        name = f"watch {self.root} {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"
        return name if len(name) <= BATCH_NAME_CHARS else "watch ..." + name[-(BATCH_NAME_CHARS - 9) :]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, BlastqError) else f"{type(exc).__name__}: {text}"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a file name (os.fsdecode's surrogates)
        return False
    return True
