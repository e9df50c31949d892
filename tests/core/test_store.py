from __future__ import annotations

import pytest

from blastq.core.adapters.store import open_store, slide_prefix
from blastq.core.common.errors import InvalidConfig


def test_put_then_get_returns_the_bytes(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    store.put("slides/abc/v1/mask.png", b"\x89PNG...")
    assert store.exists("slides/abc/v1/mask.png")
    assert store.get("slides/abc/v1/mask.png") == b"\x89PNG..."


def test_writing_a_key_twice_leaves_one_object_with_the_last_content(tmp_path):
    store = open_store(f"file://{tmp_path}")
    store.put("a/b.txt", b"first")
    store.put("a/b.txt", b"second")
    assert store.get("a/b.txt") == b"second"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]  # no temp files left


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape_the_store(tmp_path, key):
    with pytest.raises(ValueError):
        open_store(f"file://{tmp_path}").put(key, b"x")


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(InvalidConfig, match="ftp://"):
        open_store("ftp://host/x")


def test_slide_prefix_is_stable_per_identity():
    assert slide_prefix("ab" * 32, "v1", "k") == slide_prefix("ab" * 32, "v1", "k")
    assert slide_prefix("ab" * 32, "v1", "k") != slide_prefix("ab" * 32, "v2", "k")


def test_listing_skips_files_still_being_written(tmp_path):
    store = open_store(f"file://{tmp_path}")
    store.put("a/b.txt", b"x")
    (tmp_path / "a" / ".c.txt.k2j4.part").write_bytes(b"half")  # a put in progress elsewhere
    assert store.list() == ["a/b.txt"]
    assert store.list("a") == ["a/b.txt"]


def test_deleting_leaves_sibling_objects_and_tolerates_a_missing_key(tmp_path):
    store = open_store(f"file://{tmp_path}")
    store.put("a/b.txt", b"x")
    store.put("a/c.txt", b"y")
    store.delete("a/b.txt")
    store.delete("a/never.txt")
    assert store.list() == ["a/c.txt"]
    assert not (tmp_path / "a" / "b.txt").exists()


def test_listing_a_bad_prefix_is_refused(tmp_path):
    with pytest.raises(ValueError):
        open_store(f"file://{tmp_path}").list("../up")
