"""core.common.files: a file appears whole or not at all, and its sha256 streams in bounded memory."""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import pytest

from blastq.core.common.files import atomic_path, atomic_write, file_sha256, is_part_file


def test_atomic_write_replaces_a_file_and_leaves_no_temporary_behind(tmp_path):
    target = tmp_path / "deep" / "model.pt"
    atomic_write(target, b"old")
    atomic_write(target, "new text")
    assert target.read_bytes() == b"new text"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # a shared cache: readable by other users


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "cache.onnx"
    atomic_write(target, b"complete")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of a ")
        assert is_part_file(tmp.name) and tmp.parent == tmp_path
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.onnx"]


def test_a_reader_never_sees_half_a_file_while_writers_race(tmp_path):
    target = tmp_path / "ckpt.bin"
    payloads = [bytes([i]) * 200_000 for i in range(1, 5)]
    atomic_write(target, payloads[0])
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            seen.add(data[:1] * len(data))  # a mixed or short file would differ from its own first byte
            assert data in payloads

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(20):
        for data in payloads:
            atomic_write(target, data)
    stop.set()
    reader.join()
    assert seen <= set(payloads)


def test_file_sha256_streams_a_file_and_refuses_what_is_not_a_regular_file(tmp_path):
    path = tmp_path / "slide.tif"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(IsADirectoryError):
        file_sha256(tmp_path)
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing.tif")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):  # would block forever if opened
        file_sha256(fifo)


def test_part_files_are_told_from_ordinary_names():
    assert is_part_file(".a.png.x1y2.part")
    assert not is_part_file("a.part") and not is_part_file(".hidden.png")
