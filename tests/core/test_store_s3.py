"""The object stores against one contract, and S3Store against a real S3 server on loopback.

The server is moto's server app in a subprocess (tests/s3server.py), spoken to over HTTP on 127.0.0.1
by boto3 through the same code path a user's MinIO or AWS bucket takes. No client is patched; two tests
hook botocore's public event system, to count uploads and to damage one on its way.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from services import S3Server

from blastq.core.adapters.store import FileStore, ObjectStore, S3Store, open_store
from blastq.core.common.errors import InvalidConfig, StoreUnavailable, TransientError

try:
    from botocore.exceptions import ClientError
except ImportError:  # boto3 is in the service extra; CI installs it
    if os.environ.get("CI"):
        raise
    pytest.skip("boto3 is not installed", allow_module_level=True)

SECRET = "blastq-TEST-secret-7Qx2v9"  # recognisable, so a leak into a message is easy to see
KEY_ID = "blastq-test-key-id"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3server") / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Known test credentials, no user AWS config, no proxies, no instance-metadata lookups."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def fresh_bucket() -> str:
    return f"blastq-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_store(s3_server) -> S3Store:
    store = S3Store(fresh_bucket(), "lab/store", endpoint_url=s3_server.endpoint_url)
    store.ensure_bucket()
    return store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "file":
        return FileStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def count_uploads(store: S3Store) -> list[str]:
    """The keys of PutObject requests the store's client sends from now on (botocore's public events)."""
    sent: list[str] = []
    store.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.url.rsplit("/", 1)[-1])
    )
    return sent


# --- the contract both stores keep ----------------------------------------------------------------


def test_put_then_get_returns_the_same_bytes(store):
    data = bytes(range(256)) * 4
    store.put("slides/abc/v1/mask.png", data, "image/png")
    assert store.get("slides/abc/v1/mask.png") == data


def test_a_5_mb_object_round_trips(store):
    data = os.urandom(5 * 1024 * 1024 + 7)
    store.put("inputs/big.tif", data)
    assert store.get("inputs/big.tif") == data


def test_a_20_mb_file_round_trips_as_a_file(store, tmp_path):
    """put_file/get_file stream (S3: a multipart upload and ranged download above 8 MB)."""
    source = tmp_path / "scan.svs"
    source.write_bytes(os.urandom(20 * 1024 * 1024 + 3))
    store.put_file("inputs/scan.svs", source, "image/tiff")
    back = tmp_path / "back" / "scan.svs"
    back.parent.mkdir()
    store.get_file("inputs/scan.svs", back)
    assert back.read_bytes() == source.read_bytes()
    assert store.get("inputs/scan.svs") == source.read_bytes()
    assert [p.name for p in back.parent.iterdir()] == ["scan.svs"]  # no part file left


def test_get_file_of_a_missing_key_raises_and_leaves_no_file(store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError):
        store.get_file("never/written.svs", out / "x.svs")
    assert list(out.iterdir()) == []


def test_exists_only_for_written_keys(store):
    store.put("a/b.txt", b"x")
    assert store.exists("a/b.txt")
    assert not store.exists("a/c.txt")
    assert not store.exists("a")  # a folder is not an object


def test_writing_a_key_twice_leaves_one_object_with_the_last_content(store):
    store.put("a/b.txt", b"first")
    store.put("a/b.txt", b"second")
    assert store.get("a/b.txt") == b"second"
    assert store.list() == ["a/b.txt"]


def test_list_returns_the_keys_under_a_folder_sorted(store):
    for key in ["slides/s2/v1/mask.png", "slides/s1/v1/cells.csv", "slides/s1/v1/mask.png", "slides-old/x"]:
        store.put(key, b"x")
    assert store.list("slides/s1") == ["slides/s1/v1/cells.csv", "slides/s1/v1/mask.png"]
    assert store.list("slides/") == [
        "slides/s1/v1/cells.csv",
        "slides/s1/v1/mask.png",
        "slides/s2/v1/mask.png",
    ]
    assert store.list() == sorted(
        store.list("slides") + ["slides-old/x"]
    )  # 'slides' is a folder, not a string prefix
    assert store.list("nothing/here") == []


def test_objects_give_each_keys_size_and_when_it_was_written(store):
    before = datetime.now(UTC) - timedelta(seconds=2)  # the server's clock may lag ours a little
    store.put("slides/s1/v1/mask.png", b"12345")
    store.put("slides/s1/v1/cells.csv", b"")
    store.put("inputs/a.png", b"xy")
    after = datetime.now(UTC) + timedelta(seconds=2)
    objects = store.objects("slides")
    assert [(o.key, o.size) for o in objects] == [("slides/s1/v1/cells.csv", 0), ("slides/s1/v1/mask.png", 5)]
    assert all(before <= o.modified <= after and o.modified.tzinfo is not None for o in objects)
    assert [o.key for o in store.objects()] == store.list()
    assert store.objects("nothing/here") == []


def test_a_half_written_file_is_cleared_only_once_older_than_asked(tmp_path):
    store = FileStore(tmp_path / "store")
    store.put("slides/s1/mask.png", b"done")
    folder = tmp_path / "store" / "slides" / "s1"
    old, young = folder / ".cells.csv.k1.part", folder / ".summary.json.k2.part"  # as atomic_path names them
    old.write_bytes(b"half")
    young.write_bytes(b"half")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    cutoff = datetime.now(UTC) - timedelta(minutes=30)
    assert store.clear_abandoned_writes(cutoff, dry_run=True) == 1
    assert old.exists()
    assert store.clear_abandoned_writes(cutoff) == 1
    assert not old.exists() and young.exists()
    assert store.get("slides/s1/mask.png") == b"done"
    assert FileStore(tmp_path / "never-made").clear_abandoned_writes(cutoff) == 0


def test_an_unfinished_multipart_upload_is_aborted_only_once_older_than_asked(s3_store):
    client, name = s3_store.client, f"{s3_store.prefix}/inputs/big.tiff"
    upload = client.create_multipart_upload(Bucket=s3_store.bucket, Key=name)["UploadId"]
    client.upload_part(Bucket=s3_store.bucket, Key=name, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket=s3_store.bucket, Key="elsewhere/big.tiff")["UploadId"]

    def open_uploads() -> set[str]:
        return {
            u["UploadId"] for u in client.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads", [])
        }

    # A cutoff before any upload began keeps them all (moto reports one fixed initiation time, in 2010,
    # for every upload, so a cutoff between "an hour ago" and now cannot be told apart here).
    assert s3_store.clear_abandoned_writes(datetime(2001, 1, 1, tzinfo=UTC)) == 0
    assert s3_store.clear_abandoned_writes(datetime.now(UTC) + timedelta(minutes=1), dry_run=True) == 1
    assert open_uploads() == {upload, other}
    assert s3_store.clear_abandoned_writes(datetime.now(UTC) + timedelta(minutes=1)) == 1
    assert open_uploads() == {other}  # outside the store's prefix: not its upload
    assert not s3_store.exists("inputs/big.tiff")


def test_delete_removes_the_object_and_deleting_again_is_harmless(store):
    store.put("a/b.txt", b"x")
    store.put("a/c.txt", b"y")
    store.delete("a/b.txt")
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    assert store.list("a") == ["a/c.txt"]


def test_a_missing_key_raises_file_not_found_naming_the_key(store):
    with pytest.raises(FileNotFoundError, match="never/written.png"):
        store.get("never/written.png")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape_the_store(store, key):
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.delete(key)):
        with pytest.raises(ValueError):
            call()


# --- S3: verified, idempotent writes --------------------------------------------------------------


def test_reputting_identical_content_does_not_upload_again(s3_store):
    uploads = count_uploads(s3_store)
    s3_store.put("inputs/abc.png", b"slide bytes", "image/png")
    s3_store.put("inputs/abc.png", b"slide bytes", "image/png")  # a resubmit
    assert len(uploads) == 1
    s3_store.put("inputs/abc.png", b"other bytes", "image/png")
    assert len(uploads) == 2
    assert s3_store.get("inputs/abc.png") == b"other bytes"


def test_reputting_an_identical_file_does_not_upload_again(s3_store, tmp_path):
    uploads = count_uploads(s3_store)
    path = tmp_path / "slide.tif"
    path.write_bytes(b"tiff bytes")
    s3_store.put_file("inputs/slide.tif", path, "image/tiff")
    s3_store.put_file("inputs/slide.tif", path, "image/tiff")
    assert len(uploads) == 1
    path.write_bytes(b"other tiff")
    s3_store.put_file("inputs/slide.tif", path, "image/tiff")
    assert len(uploads) == 2 and s3_store.get("inputs/slide.tif") == b"other tiff"


def test_an_upload_carries_the_sha256_of_its_content(s3_store):
    data = b"summary"
    s3_store.put("slides/s/v1/summary.json", data, "application/json")
    name = "lab/store/slides/s/v1/summary.json"
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=name, ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert head["ContentType"] == "application/json"


def test_the_server_refuses_a_body_that_does_not_match_its_checksum(s3_store):
    """The test server checks checksums as S3 and MinIO do (moto alone stores them unchecked)."""
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    wrong_sha256 = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    for checksum in (
        {"ContentMD5": wrong_md5},
        {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": wrong_sha256},
    ):
        with pytest.raises(ClientError) as info:
            s3_store.client.put_object(Bucket=s3_store.bucket, Key="k", Body=b"data", **checksum)
        assert info.value.response["Error"]["Code"] == "BadDigest"
    assert s3_store.list() == []


def test_an_upload_damaged_on_the_way_is_refused_and_the_old_object_kept(s3_store):
    s3_store.put("a/b.txt", b"first")

    def damage(request, **_):
        body = request.body.getvalue() if hasattr(request.body, "getvalue") else request.body
        request.body = b"X" + body[1:]  # after the checksum was computed, before the wire

    s3_store.client.meta.events.register("before-send.s3.PutObject", damage)
    with pytest.raises(StoreUnavailable, match="a/b.txt.*corrupted"):
        s3_store.put("a/b.txt", b"second")
    s3_store.client.meta.events.unregister("before-send.s3.PutObject", damage)
    assert s3_store.get("a/b.txt") == b"first"


def test_stores_on_two_prefixes_of_one_bucket_do_not_see_each_other(s3_server, s3_store):
    other = S3Store(s3_store.bucket, "elsewhere", endpoint_url=s3_server.endpoint_url)
    other.ensure_bucket()  # already there: nothing to do
    s3_store.put("a/b.txt", b"mine")
    other.put("a/b.txt", b"theirs")
    assert s3_store.get("a/b.txt") == b"mine"
    assert other.list() == ["a/b.txt"]
    assert s3_store.list() == ["a/b.txt"]


# --- S3: errors a person can act on ---------------------------------------------------------------


def test_an_unreachable_store_is_unavailable_quickly():
    store = S3Store(
        "some-bucket",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        connect_timeout_s=1,
        read_timeout_s=2,
        max_attempts=2,
    )
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.get("a/b.txt")
    assert time.monotonic() - start < 10
    assert isinstance(info.value, TransientError)
    assert "read a/b.txt from s3://some-bucket" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_bucket_is_a_config_error_for_every_operation(s3_server):
    store = S3Store(fresh_bucket(), endpoint_url=s3_server.endpoint_url)
    calls = {
        "read": lambda: store.get("a"),
        "write": lambda: store.put("a", b"x"),
        "check": lambda: store.exists("a"),
        "delete": lambda: store.delete("a"),
        "list": lambda: store.list(),
    }
    for action, call in calls.items():
        with pytest.raises(InvalidConfig, match=f"cannot {action}.*bucket '{store.bucket}' does not exist"):
            call()


def test_refused_credentials_are_a_config_error(tmp_path):
    """A server that checks credentials (moto with auth on) does not know the test key: access denied."""
    server = S3Server(tmp_path / "server.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        store = S3Store(fresh_bucket(), endpoint_url=server.endpoint_url)
        with pytest.raises(InvalidConfig, match="access denied") as info:
            store.get("a/b.txt")
        assert not isinstance(info.value, TransientError)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("SlowDown", 503, StoreUnavailable),
        ("InternalError", 500, StoreUnavailable),
        ("RequestTimeout", 400, StoreUnavailable),
        ("AccessDenied", 403, InvalidConfig),
        ("NoSuchBucket", 404, InvalidConfig),
        ("NoSuchKey", 404, FileNotFoundError),
    ],
)
def test_server_errors_are_sorted_into_retry_or_not(s3_store, code, status, error):
    # Faults moto cannot be made to produce: the server's answer as botocore hands it over.
    answer = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    assert type(s3_store._error("read k from", ClientError(answer, "GetObject"))) is error


def test_secrets_never_appear_in_urls_reprs_or_errors(s3_server, caplog):
    caplog.set_level(logging.DEBUG)
    store = S3Store(fresh_bucket(), "p", endpoint_url=s3_server.endpoint_url)
    down = S3Store("some-bucket", endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)
    errors = []
    for call in (lambda: store.get("a"), lambda: down.get("a")):
        with pytest.raises(Exception) as info:  # noqa: B017 - any error: its text is what is checked
            call()
        errors.append("".join(traceback.format_exception(info.value)))
    store.ensure_bucket()
    with pytest.raises(FileNotFoundError) as info:
        store.get("missing")
    errors.append("".join(traceback.format_exception(info.value)))
    texts = [store.url, repr(store), repr(down), *errors, caplog.text]
    assert not [t for t in texts if SECRET in t]


# --- open_store -----------------------------------------------------------------------------------


def test_open_store_reads_bucket_and_prefix_from_an_s3_url(s3_server):
    store = open_store("s3://blastq-lab/runs/2026/", endpoint_url=s3_server.endpoint_url, region="eu-west-1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.url) == ("blastq-lab", "runs/2026", "s3://blastq-lab/runs/2026")
    assert store.client.meta.region_name == "eu-west-1"
    assert open_store("s3://blastq-lab").url == "s3://blastq-lab"


@pytest.mark.parametrize("url", ["s3://", "s3://Bad_Bucket/x", "s3://blastq-lab/x?versionId=1"])
def test_bad_s3_urls_are_config_errors(url):
    with pytest.raises(InvalidConfig):
        open_store(url)


def test_credentials_in_an_s3_url_are_refused_without_repeating_them():
    with pytest.raises(InvalidConfig) as info:
        open_store(f"s3://{KEY_ID}:{SECRET}@blastq-lab/p")
    assert SECRET not in str(info.value)
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value)
