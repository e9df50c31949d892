"""The scanner-folder watcher: complete files submitted once, across restarts, races and bad files.

Most tests use the embedded defaults (SQLite, a file store, the SQLite broker) and no worker: they
look at what a scan returns and at the job and ledger rows. Time is a fake clock moved by the test.
The ledger's claim is also checked on the real PostgreSQL, and the last test runs `blastq watch
--once` against the real PostgreSQL, Redis and S3 server with a worker process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from servicekit import Service, use_service, wait_until
from sqlalchemy import select, update

from blastq.core.adapters.db import JobRow, WatchLedgerRow, connect, job_counts, job_status, watched_files
from blastq.core.adapters.settings import load_settings
from blastq.core.common.errors import StoreUnavailable
from blastq.worker import watch as watch_module
from blastq.worker.submit import submit
from blastq.worker.watch import Watcher, is_candidate, stop_on_signals


class Clock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def settings(tmp_path):
    return load_settings({"BLASTQ_DATA_DIR": str(tmp_path / "data"), "BLASTQ_WATCH_SETTLE_S": "10"})


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "scans"
    path.mkdir()
    return path


@pytest.fixture
def db(settings):
    engine = connect(settings.database_url.get_secret_value())
    yield engine
    engine.dispose()


@pytest.fixture
def make_watcher(settings, folder):
    """make_watcher(**kwargs) -> a Watcher on `folder` with its own fake clock; all closed at teardown."""
    made: list[Watcher] = []

    def make(**kwargs) -> Watcher:
        clock = Clock()
        kwargs = {"clock": clock, "sleep": clock.advance, **kwargs}
        made.append(Watcher(kwargs.pop("settings", settings), folder, **kwargs))
        return made[-1]

    yield make
    for watcher in made:
        watcher.close()


def write_image(path: Path, seed: int) -> bytes:
    """A small PNG, its content different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    data = cv2.imencode(".png", pixels)[1].tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def ledger(db, root: Path) -> dict[str, list[tuple[str, str | None]]]:
    """relpath -> [(state, reason), ...], one entry per file version."""
    rows: dict[str, list[tuple[str, str | None]]] = {}
    for entry in watched_files(db, str(root.resolve())):
        rows.setdefault(entry.relpath, []).append((entry.state, entry.reason))
    return rows


def job_files(db) -> list[str]:
    with db.connect() as c:
        return sorted(Path(name).name for name in c.scalars(select(JobRow.filename)))


def names(events) -> list[str]:
    return sorted(Path(e.path).name for e in events)


def scan_settled(watcher: Watcher):
    """The scan that finds the files present since the watcher's first scan complete."""
    watcher.scan_once(0)
    return watcher.scan_once(watcher.settings.watch_settle_s)


# --- what counts as complete ------------------------------------------------------------------------


def test_a_file_still_growing_is_submitted_once_unchanged_for_the_settle_time(make_watcher, folder, db):
    watcher = make_watcher()
    slide = folder / "slide.png"
    data = write_image(slide, 1)
    with slide.open("r+b") as f:  # the scanner has written half so far
        f.truncate(len(data) // 2)

    first = watcher.scan_once(0)
    assert first.events == () and first.pending == ("slide.png",) and first.next_ready_at == 10

    slide.write_bytes(data)  # grown since the last scan: the settle time starts again
    assert watcher.scan_once(5).pending == ("slide.png",)
    assert watcher.scan_once(14).events == ()

    done = watcher.scan_once(15)
    assert names(done.submitted) == ["slide.png"] and done.pending == ()
    job = job_status(db, done.submitted[0].job_id)
    assert job.state == "queued" and job.filename == str(slide.resolve())
    (entry,) = watched_files(db, str(folder.resolve()))
    assert (entry.state, entry.job_id) == ("submitted", job.id)
    assert entry.sha256 == hashlib.sha256(data).hexdigest() == job.sha256
    assert watcher.scan_once(100).events == ()  # submitted once


def test_a_done_or_ready_marker_submits_at_once(make_watcher, folder, db):
    write_image(folder / "a.png", 1)
    (folder / "a.png.done").touch()
    write_image(folder / "b.tif", 2)
    (folder / "b.ready").touch()
    write_image(folder / "c.png", 3)

    scan = make_watcher().scan_once(0)
    assert names(scan.submitted) == ["a.png", "b.tif"]
    assert scan.pending == ("c.png",)
    assert job_counts(db) == {"queued": 2}


def test_hidden_temporary_partial_and_non_image_names_are_never_submitted(make_watcher, folder, db):
    ignored = [
        ".hidden.png",
        "slide.png.part",
        "slide.tmp",
        "slide.png.crdownload",
        "~slide.png",
        "slide.png.partial",
        "notes.txt",
        "slide.png.done",
        "sub/nested.png",  # not --recursive
    ]
    for i, name in enumerate(ignored):
        write_image(folder / name, i)
    os.mkfifo(folder / "pipe.png")
    write_image(folder / "SCAN.TIFF", 99)

    watcher = make_watcher()
    for now in (0, 10, 100):
        scan = watcher.scan_once(now)
        assert scan.rejected == () and scan.pending in ((), ("SCAN.TIFF",))
    assert job_files(db) == ["SCAN.TIFF"]
    assert list(ledger(db, folder)) == ["SCAN.TIFF"]
    assert [n for n in ignored if is_candidate(Path(n).name)] == ["sub/nested.png"]


def test_a_symlink_out_of_the_folder_is_rejected_and_symlinked_folders_are_not_entered(
    make_watcher, folder, tmp_path, db
):
    outside = tmp_path / "private"
    write_image(outside / "secret.png", 1)
    write_image(outside / "other.png", 2)
    (folder / "link.png").symlink_to(outside / "secret.png")
    (folder / "elsewhere").symlink_to(outside, target_is_directory=True)
    write_image(folder / "sub" / "inside.png", 3)
    (folder / "alias.png").symlink_to(folder / "sub" / "inside.png")  # inside: allowed

    watcher = make_watcher(recursive=True)
    first = watcher.scan_once(0)
    (rejected,) = first.rejected
    assert rejected.path == str(folder.resolve() / "link.png")
    assert "outside the watched folder" in rejected.reason
    assert str((outside / "secret.png").resolve()) in rejected.reason
    assert watcher.scan_once(10).rejected == ()  # recorded once
    assert watcher.scan_once(20).rejected == ()
    assert job_files(db) == ["alias.png", "inside.png"]
    rows = ledger(db, folder)
    assert rows["link.png"] == [("rejected", rejected.reason)]
    assert sorted(rows) == ["alias.png", "link.png", "sub/inside.png"]


# --- restarts and races -----------------------------------------------------------------------------


def test_a_watcher_restarted_mid_folder_submits_only_the_rest(make_watcher, folder, db, monkeypatch):
    monkeypatch.setattr(watch_module, "SUBMIT_CHUNK", 1)  # one file per submit: stop between files
    for i in range(5):
        write_image(folder / f"slide_{i}.png", i)
    stop = threading.Event()
    calls = []

    def submit_then_stop_after_three(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            stop.set()  # SIGTERM arrives: the file in hand is finished, then the watcher stops
        return submit(*args, **kwargs)

    first = make_watcher(stop=stop, submit_files=submit_then_stop_after_three)
    summary = first.run()
    assert (summary.submitted, len(calls)) == (3, 3)
    first.close()

    second = make_watcher()
    restarted = second.scan_once(0)
    assert restarted.submitted == ()
    assert restarted.pending == ("slide_3.png", "slide_4.png")  # the three submitted are known at once
    rest = second.scan_once(10)
    assert len(rest.submitted) == 2
    assert job_counts(db) == {"queued": 5}
    assert sorted(job_files(db)) == [f"slide_{i}.png" for i in range(5)]
    assert all(states == [("submitted", None)] for states in ledger(db, folder).values())


class Crash(BaseException):
    """The watcher process dying (SIGKILL, power cut) at a chosen point."""


@pytest.mark.parametrize("job_made", [False, True], ids=["before-the-job", "after-the-job"])
def test_a_claim_left_by_a_dead_watcher_is_taken_over_without_a_second_job(
    make_watcher, folder, db, job_made
):
    write_image(folder / "slide.png", 1)
    (folder / "slide.png.done").touch()

    def die(*args, **kwargs):
        if job_made:
            submit(*args, **kwargs)
        raise Crash

    with pytest.raises(Crash):
        make_watcher(submit_files=die).scan_once(10)
    assert ledger(db, folder) == {"slide.png": [("seen", None)]}

    fresh = make_watcher()
    assert fresh.scan_once(10).submitted == ()  # the claim is young: its watcher may be uploading
    with db.begin() as c:  # ...until it is older than watch_claim_timeout_s
        c.execute(update(WatchLedgerRow).values(updated_at=datetime.now(UTC) - timedelta(hours=1)))
    assert names(fresh.scan_once(20).submitted) == ["slide.png"]
    assert job_counts(db) == {"queued": 1}
    assert ledger(db, folder) == {"slide.png": [("submitted", None)]}


def test_two_watchers_racing_on_one_folder_submit_each_file_once(make_watcher, settings, folder, db):
    for i in range(6):
        write_image(folder / f"slide_{i}.png", i)
    eager = settings.updated(watch_settle_s=0.0)
    watchers = [make_watcher(settings=eager, clock=time.monotonic) for _ in range(2)]
    start = threading.Barrier(2)
    submitted: list[str] = []
    errors: list[BaseException] = []

    def watch(watcher: Watcher) -> None:
        try:
            start.wait()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                scan = watcher.scan_once()
                submitted.extend(e.path for e in scan.submitted)
                if not scan.retrying and len(watched_files(db, str(folder.resolve()))) == 6:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=watch, args=(w,)) for w in watchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(Counter(submitted).values()) == [1] * 6
    assert job_counts(db) == {"queued": 6}
    assert all(states == [("submitted", None)] for states in ledger(db, folder).values())


def test_a_file_rewritten_after_submission_is_a_new_version_and_submitted_again(make_watcher, folder, db):
    slide = folder / "slide.png"
    write_image(slide, 1)
    watcher = make_watcher()
    watcher.scan_once(0)
    assert len(watcher.scan_once(10).submitted) == 1

    write_image(slide, 2)
    os.utime(slide, ns=(time.time_ns(), slide.stat().st_mtime_ns + 1_000_000))
    assert watcher.scan_once(11).submitted == ()
    assert len(watcher.scan_once(21).submitted) == 1
    assert job_counts(db) == {"queued": 2}
    assert ledger(db, folder) == {"slide.png": [("submitted", None), ("submitted", None)]}


# --- bad files and faults ---------------------------------------------------------------------------


def test_a_vanished_file_and_a_non_image_are_rejected_with_their_reasons_and_the_rest_go_on(
    make_watcher, folder, db
):
    write_image(folder / "a.png", 1)
    # Not an image by its header: refused at submit, as the worker would refuse it (pixels it judges).
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    write_image(folder / "vanishing.png", 3)
    write_image(folder / "z.png", 4)

    def file_gone_before_reading(settings, paths, **kwargs):
        (folder / "vanishing.png").unlink()  # gone between listing and reading
        return submit(settings, paths, **kwargs)

    scan = scan_settled(make_watcher(submit_files=file_gone_before_reading))
    assert names(scan.submitted) == ["a.png", "z.png"]
    reasons = {Path(e.path).name: e.reason for e in scan.rejected}
    assert reasons == {
        "corrupt.png": "not a PNG, JPEG, BMP or TIFF image (unrecognised leading bytes)",
        "vanishing.png": "no such file",
    }
    assert ledger(db, folder)["vanishing.png"] == [("rejected", "no such file")]
    assert job_files(db) == ["a.png", "z.png"]


def test_a_file_that_makes_submit_raise_is_rejected_alone(make_watcher, folder, db):
    for i, name in enumerate(["a.png", "bad.png", "c.png"]):
        write_image(folder / name, i)

    def choke_on_bad(settings, paths, **kwargs):
        if any(p.endswith("bad.png") for p in paths):
            raise ValueError("value too long for type character varying(512)")
        return submit(settings, paths, **kwargs)

    scan = scan_settled(make_watcher(submit_files=choke_on_bad))
    assert names(scan.submitted) == ["a.png", "c.png"]
    (rejected,) = scan.rejected
    assert rejected.reason == "ValueError: value too long for type character varying(512)"
    assert ledger(db, folder)["bad.png"] == [("rejected", rejected.reason)]
    assert job_files(db) == ["a.png", "c.png"]


def test_a_store_fault_mid_submit_keeps_what_was_made_and_retries_the_rest(make_watcher, folder, db):
    for i in range(3):
        write_image(folder / f"slide_{i}.png", i)
    calls = []

    def store_fails_after_the_first_file(settings, paths, **kwargs):
        calls.append(paths)
        if len(calls) == 1:
            submit(settings, paths[:1], **kwargs)
            raise StoreUnavailable("cannot write inputs/... to s3://lab: connection refused")
        return submit(settings, paths, **kwargs)

    watcher = make_watcher(submit_files=store_fails_after_the_first_file)
    first = scan_settled(watcher)
    assert names(first.submitted) == ["slide_0.png"]
    assert names(first.retrying) == ["slide_1.png", "slide_2.png"]
    assert "connection refused" in first.retrying[0].reason
    assert list(ledger(db, folder)) == ["slide_0.png"]  # no claim left on a file never submitted

    second = watcher.scan_once(12)
    assert names(second.submitted) == ["slide_1.png", "slide_2.png"]
    assert job_files(db) == ["slide_0.png", "slide_1.png", "slide_2.png"]


def test_a_message_the_broker_refused_is_sent_on_the_next_scan(make_watcher, settings, folder, db):
    from blastq.worker.celery_app import make_app

    class BrokerDownOnce:
        def __init__(self, app):
            self.app, self.sent = app, []

        def send_task(self, *args, **kwargs):
            if not self.sent:
                self.sent.append(None)
                raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            self.sent.append(kwargs["args"][0])
            return self.app.send_task(*args, **kwargs)

    app = make_app(settings)
    broker = BrokerDownOnce(app)
    write_image(folder / "slide.png", 1)
    watcher = make_watcher(app=broker)
    (event,) = scan_settled(watcher).events
    assert event.state == "submitted" and "the broker did not take it" in event.reason
    assert watcher.scan_once(12).events == ()
    assert broker.sent == [None, event.job_id]
    assert job_counts(db) == {"queued": 1}
    app.close()


def test_a_database_that_does_not_answer_is_a_retry_not_a_crash(make_watcher, settings, folder):
    write_image(folder / "slide.png", 1)
    down = settings.updated(database_url="postgresql+psycopg://blastq@127.0.0.1:1/blastq")
    watcher = make_watcher(settings=down)
    for now in (0, 10):
        (event,) = watcher.scan_once(now).events
        assert event.state == "retry" and "not reachable" in event.reason


# --- the loop ---------------------------------------------------------------------------------------


def test_sigterm_stops_the_loop_after_the_scan_in_hand(make_watcher, folder):
    write_image(folder / "slide.png", 1)
    (folder / "slide.png.done").touch()
    watcher = make_watcher(sleep=lambda _s: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(watcher.stop):
        summary = watcher.run()
    assert watcher.stop.is_set() and summary.submitted == 1
    assert signal.getsignal(signal.SIGTERM) is previous


def test_once_waits_for_settling_files_at_most_the_settle_time(make_watcher, folder):
    write_image(folder / "ready.png", 1)
    clock = Clock()
    growing = folder / "growing.png"
    data = write_image(growing, 2)

    def sleep(seconds: float) -> None:
        clock.advance(seconds)
        growing.write_bytes(data * int(clock.t + 2))  # still being written

    summary = make_watcher(clock=clock, sleep=sleep).run(once=True)
    assert (summary.submitted, summary.rejected) == (1, 0)
    assert clock.t == 10


# --- the ledger on both databases -------------------------------------------------------------------


@pytest.fixture
def ledger_db(migrated_db):
    return migrated_db


def test_the_ledger_insert_is_the_claim_and_a_stale_claim_is_taken_over_once(ledger_db):
    from blastq.core.adapters.db import claim_watched_file, record_watched_file, release_watched_file

    stale_after = timedelta(minutes=5)
    version = ("/scans", "a.png", 1000, 1_700_000_000_123_456_789)
    mine, claimed = claim_watched_file(ledger_db, *version, stale_after=stale_after)
    assert claimed and mine.state == "seen"
    theirs, claimed = claim_watched_file(ledger_db, *version, stale_after=stale_after)
    assert not claimed and theirs.id == mine.id

    with ledger_db.begin() as c:  # its watcher died an hour ago
        c.execute(update(WatchLedgerRow).values(updated_at=datetime.now(UTC) - timedelta(hours=1)))
    old, claimed = claim_watched_file(ledger_db, *version, stale_after=stale_after)
    assert claimed and old.id == mine.id and old.updated_at < datetime.now(UTC) - stale_after
    assert not claim_watched_file(ledger_db, *version, stale_after=stale_after)[1]  # taken over once

    record_watched_file(ledger_db, mine.id, "submitted", sha256="ab" * 32)
    release_watched_file(ledger_db, mine.id)  # a settled row is not a claim to give up
    (row,) = watched_files(ledger_db, "/scans", ["a.png"])
    assert (row.state, row.sha256, row.mtime_ns) == ("submitted", "ab" * 32, version[3])
    assert claim_watched_file(ledger_db, *version, stale_after=stale_after) == (row, False)

    newer, claimed = claim_watched_file(
        ledger_db, "/scans", "a.png", 1001, version[3] + 1, stale_after=stale_after
    )
    assert claimed
    release_watched_file(ledger_db, newer.id)
    assert watched_files(ledger_db, "/scans") == [row] and watched_files(ledger_db, "/other") == []


# --- end to end -------------------------------------------------------------------------------------


def test_watch_once_prints_each_file_and_exits_1_when_one_was_rejected(cli, folder, tmp_path, monkeypatch):
    use_service(monkeypatch, Service({"BLASTQ_DATA_DIR": str(tmp_path / "data")}, tmp_path / "data"))
    write_image(folder / "slide.png", 1)
    write_image(tmp_path / "secret.png", 2)
    (folder / "link.png").symlink_to(tmp_path / "secret.png")

    watched = cli("watch", folder, "--once", "--settle", "0")
    assert watched.exit_code == 1, watched.output
    lines = watched.output.splitlines()
    assert any(line.startswith(f"submitted {folder.resolve() / 'slide.png'}: job ") for line in lines)
    assert any(line.startswith(f"rejected {folder.resolve() / 'link.png'}: symlink to ") for line in lines)
    again = cli("watch", folder, "--once", "--settle", "0")
    assert again.exit_code == 0 and "submitted" not in again.output and "rejected" not in again.output
    assert cli("watch", tmp_path / "nowhere", "--once").exit_code == 2


def test_watch_once_submits_a_folder_and_a_worker_processes_it(
    lab_service, lab_worker, cli, make_slide, tmp_path, monkeypatch
):
    use_service(monkeypatch, lab_service)
    scans = tmp_path / "scanner"
    scans.mkdir()
    for seed in (301, 302):
        shutil.copy(make_slide(seed), scans / f"scan_{seed}.png")
    (scans / "scan_303.png.part").write_bytes(b"half a slide")

    watched = cli("watch", scans, "--once", "--settle", "0", "--batch", "scanner")
    assert watched.exit_code == 0, watched.output
    job_ids = [line.split(" job ")[1].split()[0] for line in watched.output.splitlines() if " job " in line]
    assert len(job_ids) == 2

    db = connect(lab_service.settings().database_url.get_secret_value())
    try:

        def finished():
            jobs = [job_status(db, j) for j in job_ids]
            return all(j.state in ("succeeded", "failed") for j in jobs) and jobs

        jobs = wait_until(finished, 120, "the watched slides to be processed")
        assert [j.state for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
        again = cli("watch", scans, "--once", "--settle", "0")
        assert again.exit_code == 0 and " job " not in again.output  # the ledger remembers
    finally:
        db.dispose()


def test_one_watcher_run_keeps_one_batch_across_scans(make_watcher, folder, db):
    watcher = make_watcher()
    write_image(folder / "a.png", 1)
    assert names(scan_settled(watcher).events) == ["a.png"]
    write_image(folder / "b.png", 2)
    watcher.scan_once(20)
    assert names(watcher.scan_once(20 + watcher.settings.watch_settle_s).events) == ["b.png"]
    with db.connect() as c:
        batches = set(c.scalars(select(JobRow.batch_id)))
    assert len(batches) == 1 and None not in batches


# --- samples: one sub-folder per patient ------------------------------------------------------------


def job_samples(db) -> dict[str, str | None]:
    """file name -> the name of its job's sample (None: no sample)."""
    from blastq.core.adapters.db import SampleRow

    with db.connect() as c:
        rows = c.execute(
            select(JobRow.filename, SampleRow.name).outerjoin(SampleRow, SampleRow.id == JobRow.sample_id)
        )
        return {Path(filename).name: sample for filename, sample in rows}


def test_with_samples_each_sub_folder_is_one_sample_and_top_level_files_are_none(make_watcher, folder, db):
    write_image(folder / "P-17" / "field1.png", 1)
    write_image(folder / "P-17" / "field2.png", 2)
    write_image(folder / "P-18" / "field1b.png", 3)
    write_image(folder / "loose.png", 4)
    scan = scan_settled(make_watcher(samples=True))
    assert names(scan.submitted) == ["field1.png", "field1b.png", "field2.png", "loose.png"]
    assert job_samples(db) == {
        "field1.png": "P-17",
        "field2.png": "P-17",
        "field1b.png": "P-18",
        "loose.png": None,
    }


def test_without_samples_sub_folders_make_no_sample(make_watcher, folder, db):
    write_image(folder / "2026-12-01" / "field.png", 1)
    scan = scan_settled(make_watcher(recursive=True))
    assert names(scan.submitted) == ["field.png"] and job_samples(db) == {"field.png": None}
