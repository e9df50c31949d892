"""The object store adapter: where artifacts live. `file://` on one machine, `s3://` (any S3-compatible
endpoint, through boto3) for the service.

Keys are '/'-separated (slides/<sha256>/<model version>/<name>). Writes are atomic and idempotent:
writing the same key twice leaves one object with the last content, never a partial one. Both stores
raise FileNotFoundError for a missing key, StoreUnavailable (transient: retry) when the store does not
answer, and InvalidConfig when retrying cannot help (no such bucket, access denied).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

from blastq.core.common import (
    PART_SUFFIX,
    InvalidConfig,
    StoreUnavailable,
    atomic_path,
    atomic_write,
    file_sha256,
    is_part_file,
)

if TYPE_CHECKING:
    from blastq.core.adapters.settings import Settings

T = TypeVar("T")


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes: ...
    # Files: streamed, never whole in memory (whole-slide scans are gigabytes).
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    # Retention (`blastq gc`): what is stored and since when, and writes a killed process left behind.
    def objects(self, prefix: str = "") -> list[StoredObject]: ...
    def clear_abandoned_writes(self, before: datetime, *, dry_run: bool = False) -> int: ...


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int  # bytes
    modified: datetime  # UTC: when it was last written


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad object key: {key!r}")
    return key


def _check_prefix(prefix: str) -> str:
    """A folder of keys ('' for all of them); a trailing '/' is allowed."""
    prefix = prefix.rstrip("/")
    return _check_key(prefix) if prefix else ""


class FileStore:
    """Objects as files under a root folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def __repr__(self) -> str:
        return f"FileStore({self.url!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write `data` under `key`, replacing any object there."""
        try:
            atomic_write(self._path(key), data)  # readers see the old object or the new one, never half
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {key} to {self.url}: {exc.strerror or exc}") from exc

    def get(self, key: str) -> bytes:
        """The bytes under `key`; FileNotFoundError if there are none."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {key} from {self.url}: {exc.strerror or exc}") from exc

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """Copy the file at `path` under `key` (atomically, as put)."""
        try:
            with atomic_path(self._path(key)) as tmp:
                shutil.copyfile(path, tmp)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {key} to {self.url}: {exc.strerror or exc}") from exc

    def get_file(self, key: str, path: Path) -> None:
        """Copy the object under `key` to the file `path`; FileNotFoundError if there is none."""
        _copy_into(self._path(key), Path(path), key, self.url)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove the object under `key`; a missing key is not an error (deletes are idempotent)."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot delete {key} in {self.url}: {exc.strerror or exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        """The keys under the folder `prefix` (all keys for ''), at any depth, sorted."""
        prefix = _check_prefix(prefix)
        folder = self.root.joinpath(*prefix.split("/")) if prefix else self.root
        try:
            return sorted(
                p.relative_to(self.root).as_posix()
                for p in folder.rglob("*")
                if p.is_file() and not is_part_file(p.name)  # half-written
            )
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot list {prefix or '/'} in {self.url}: {exc.strerror or exc}"
            ) from exc

    def objects(self, prefix: str = "") -> list[StoredObject]:
        """The objects under the folder `prefix`, with their sizes and modification times, sorted by key."""
        found = []
        for key in self.list(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:  # deleted since it was listed
                continue
            except OSError as exc:
                raise StoreUnavailable(f"cannot read {key} in {self.url}: {exc.strerror or exc}") from exc
            found.append(StoredObject(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        return found

    def clear_abandoned_writes(self, before: datetime, *, dry_run: bool = False) -> int:
        """Remove the temporary files of writes begun before `before` (a process killed mid-write leaves
        one); returns how many there were."""
        cutoff = before.timestamp()
        count = 0
        try:
            for path in self.root.rglob(f".*{PART_SUFFIX}"):
                if is_part_file(path.name) and path.is_file() and path.stat().st_mtime < cutoff:
                    count += 1
                    if not dry_run:
                        path.unlink(missing_ok=True)
        except FileNotFoundError:  # the root (or a file) went meanwhile: nothing more to clear there
            pass
        except OSError as exc:
            raise StoreUnavailable(f"cannot clear old writes in {self.url}: {exc.strerror or exc}") from exc
        return count


def _copy_into(source: Path, path: Path, key: str, url: str) -> None:
    try:
        with atomic_path(path) as tmp:
            shutil.copyfile(source, tmp)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {key} from {url}: {exc.strerror or exc}") from exc


# S3 error codes by what a caller can do about them. A HEAD has no body, so it reports a bare status.
_MISSING_KEY_CODES = {"NoSuchKey", "NotFound", "404"}
_CORRUPT_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "IncompleteBody"}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "ServiceUnavailable",
    "InternalError",
    "OperationAborted",
}
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


class S3Store:
    """Objects in an S3 bucket (AWS, MinIO or any S3-compatible endpoint), under an optional key prefix.

    Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
    ~/.aws, instance roles) and never appear in the store's URL, repr or error messages.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 3,
    ):
        if not _BUCKET_NAME.fullmatch(bucket):
            raise InvalidConfig(f"bad S3 bucket name {bucket!r}: 3-63 characters of a-z, 0-9, '.', '-'")
        self.bucket = bucket
        self.prefix = _check_prefix(prefix.strip("/"))
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = (
            client
            if client is not None
            else self._make_client(endpoint_url, region, connect_timeout_s, read_timeout_s, max_attempts)
        )
        self._bucket_seen = False  # a HEAD 404 cannot tell a missing key from a missing bucket

    def _make_client(
        self,
        endpoint_url: str | None,
        region: str | None,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_attempts: int,
    ) -> Any:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError
        except ImportError as exc:
            raise InvalidConfig(f"{self.url} needs boto3: pip install 'blastq[service]'") from exc
        # Short timeouts and a few quick retries: a store that is down for longer fails the call with
        # StoreUnavailable, and the worker's own retry policy (with backoff) takes it from there.
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": max_attempts},  # the first try included
            s3={"addressing_style": "path"} if endpoint_url else None,  # MinIO & co. have no bucket DNS
        )
        try:
            # One session per store: boto3's default session is shared and not thread-safe to build on.
            return boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        except (BotoCoreError, ValueError) as exc:
            where = f" at {_without_password(endpoint_url)}" if endpoint_url else ""
            raise InvalidConfig(f"cannot set up {self.url}{where}: {type(exc).__name__}") from exc

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self._endpoint!r})"

    @property
    def _endpoint(self) -> str:
        return _without_password(str(self.client.meta.endpoint_url))

    def _name(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write `data` under `key`, replacing any object there; skips the upload if it is already there.

        The SHA-256 travels as the upload's checksum, so the server refuses a body damaged on the way, and
        as object metadata, so a re-put of the same content (a resubmitted slide) costs one HEAD.
        """
        name = self._name(key)
        digest = hashlib.sha256(data).digest()
        head = self._head(name, f"write {key} to")
        if (
            head is not None
            and head.get("Metadata", {}).get("sha256") == digest.hex()
            and head.get("ContentLength") == len(data)
            and head.get("ContentType") == content_type
        ):
            return
        self._call(
            f"write {key} to",
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=data,
                ContentType=content_type,
                Metadata={"sha256": digest.hex()},
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=base64.b64encode(digest).decode(),
            ),
        )

    def get(self, key: str) -> bytes:
        """The bytes under `key`; FileNotFoundError if there are none."""
        name = self._name(key)

        def read() -> bytes:
            # ChecksumMode: botocore checks the body against the SHA-256 stored with the object.
            response = self.client.get_object(Bucket=self.bucket, Key=name, ChecksumMode="ENABLED")
            return response["Body"].read()

        return self._call(f"read {key} from", read)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """Upload the file at `path` under `key`, in parts above 8 MB (boto3's managed transfer), each
        part with its SHA-256 checksum; skipped, as put, when the same content is there already."""
        name = self._name(key)
        digest = bytes.fromhex(file_sha256(path))
        size = Path(path).stat().st_size
        head = self._head(name, f"write {key} to")
        if (
            head is not None
            and head.get("Metadata", {}).get("sha256") == digest.hex()
            and head.get("ContentLength") == size
            and head.get("ContentType") == content_type
        ):
            return
        extra = {
            "ContentType": content_type,
            "Metadata": {"sha256": digest.hex()},
            "ChecksumAlgorithm": "SHA256",
        }
        self._call(
            f"write {key} to", lambda: self.client.upload_file(str(path), self.bucket, name, ExtraArgs=extra)
        )

    def get_file(self, key: str, path: Path) -> None:
        """Download the object under `key` to the file `path` (checksums checked; in parts when large);
        FileNotFoundError if there is none. The file appears whole or not at all."""
        name, path = self._name(key), Path(path)
        with atomic_path(path) as tmp:
            self._call(
                f"read {key} from",
                lambda: self.client.download_file(
                    self.bucket, name, str(tmp), ExtraArgs={"ChecksumMode": "ENABLED"}
                ),
            )

    def exists(self, key: str) -> bool:
        return self._head(self._name(key), f"check {key} in") is not None

    def delete(self, key: str) -> None:
        """Remove the object under `key`; a missing key is not an error (deletes are idempotent)."""
        name = self._name(key)
        self._call(f"delete {key} in", lambda: self.client.delete_object(Bucket=self.bucket, Key=name))

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (setup and tests; users may prefer to create it themselves)."""
        from botocore.exceptions import ClientError

        try:
            self._call("check the bucket of", lambda: self.client.head_bucket(Bucket=self.bucket))
            return
        except FileNotFoundError:  # HEAD answers a bare 404 for a missing bucket
            pass
        region = self.client.meta.region_name
        options: dict[str, Any] = {}
        if region and region not in ("us-east-1", "aws-global"):
            options["CreateBucketConfiguration"] = {"LocationConstraint": region}

        def create() -> None:
            try:
                self.client.create_bucket(Bucket=self.bucket, **options)
            except ClientError as exc:
                if _code(exc) != "BucketAlreadyOwnedByYou":  # created meanwhile by another process: fine
                    raise

        self._call("create the bucket of", create)

    def _head(self, name: str, action: str) -> dict[str, Any] | None:
        """The object's HEAD response, or None if there is no such object (in a bucket that exists)."""
        try:
            return self._call(action, lambda: self.client.head_object(Bucket=self.bucket, Key=name))
        except FileNotFoundError:
            if not self._bucket_seen:
                try:
                    self._call(action, lambda: self.client.head_bucket(Bucket=self.bucket))
                except FileNotFoundError as exc:
                    raise self._no_bucket(action) from exc
                self._bucket_seen = True
            return None

    def _no_bucket(self, action: str) -> InvalidConfig:
        return InvalidConfig(
            f"cannot {action} {self.url}: bucket {self.bucket!r} does not exist at {self._endpoint} "
            "(create it, or fix the store URL)"
        )

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            error = self._error(action, exc)
            if error is exc:
                raise
            raise error from exc

    def _error(self, action: str, exc: Exception) -> Exception:
        """The blastq error for a boto3/botocore failure; other exceptions come back unchanged.

        Messages name the action, the key and the store URL, never credentials.
        """
        import botocore.exceptions as bx

        where = f"cannot {action} {self.url}"
        if isinstance(exc, bx.ClientError):
            code, status = _code(exc), _status(exc)
            message = " ".join(str(exc.response.get("Error", {}).get("Message", "")).split())
            detail = f"{code}{': ' + message if message and message != code else ''}"
            if code == "NoSuchBucket":
                return self._no_bucket(action)
            if code in _MISSING_KEY_CODES:
                return FileNotFoundError(f"{where}: no such object")
            if code in _CORRUPT_CODES:
                return StoreUnavailable(f"{where}: the server refused a corrupted upload ({detail})")
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return StoreUnavailable(f"{where}: the store is unavailable ({detail})")
            if status in (401, 403):
                return InvalidConfig(
                    f"{where}: access denied ({detail}); check the AWS credentials and the bucket policy"
                )
            if status == 301 or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
                return InvalidConfig(
                    f"{where}: the bucket is in another region ({detail}); set the store region"
                )
            return InvalidConfig(f"{where}: the store refused the request ({detail})")
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError | bx.CredentialRetrievalError):
            return InvalidConfig(
                f"{where}: no usable AWS credentials ({type(exc).__name__}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.IncompleteReadError):
            return StoreUnavailable(f"{where}: no answer from {self._endpoint} ({type(exc).__name__})")
        if isinstance(exc, bx.ChecksumError):
            return StoreUnavailable(f"{where}: the object arrived damaged ({type(exc).__name__})")
        if isinstance(exc, bx.BotoCoreError) and not isinstance(exc, bx.ParamValidationError):
            return StoreUnavailable(f"{where}: {type(exc).__name__}")
        return exc

    def list(self, prefix: str = "") -> list[str]:
        """The keys under the folder `prefix` (all keys for ''), at any depth, sorted."""
        prefix = _check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        search = f"{root}{prefix}/" if prefix else root

        def names() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=search)
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

        # Keys ending in '/' are folder markers some tools create, not objects.
        return sorted(
            n[len(root) :] for n in self._call(f"list {prefix or '/'} in", names) if not n.endswith("/")
        )

    def objects(self, prefix: str = "") -> list[StoredObject]:
        """The objects under the folder `prefix`, with their sizes and modification times, sorted by key."""
        root = f"{self.prefix}/" if self.prefix else ""
        search = f"{root}{_check_prefix(prefix)}/" if _check_prefix(prefix) else root

        def listed() -> list[dict[str, Any]]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=search)
            return [obj for page in pages for obj in page.get("Contents", [])]

        return sorted(
            (
                StoredObject(o["Key"][len(root) :], int(o["Size"]), o["LastModified"].astimezone(UTC))
                for o in self._call(f"list {prefix or '/'} in", listed)
                if not o["Key"].endswith("/")
            ),
            key=lambda o: o.key,
        )

    def clear_abandoned_writes(self, before: datetime, *, dry_run: bool = False) -> int:
        """Abort the multipart uploads begun before `before` under this store's prefix (a process killed
        while uploading a large file leaves one, and the server keeps its parts); returns how many."""
        search = f"{self.prefix}/" if self.prefix else ""

        def uploads() -> list[dict[str, Any]]:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=search
            )
            return [u for page in pages for u in page.get("Uploads", [])]

        def abort(upload: dict[str, Any]) -> None:
            from botocore.exceptions import ClientError

            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
            except ClientError as exc:
                if _code(exc) != "NoSuchUpload":  # aborted or completed meanwhile: fine
                    raise

        old = [u for u in self._call("list the uploads in", uploads) if u["Initiated"] < before]
        for upload in [] if dry_run else old:
            self._call("abort an upload in", lambda u=upload: abort(u))
        return len(old)


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _without_password(url: str) -> str:
    """`url` with any user:password@ part dropped, fit for a message."""
    parsed = urlparse(url)
    if parsed.username is None and parsed.password is None:
        return url
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()


def open_store(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> ObjectStore:
    """A store for a URL: file:///path, or s3://bucket[/prefix] (endpoint and region for non-AWS servers)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(unquote(parsed.netloc + parsed.path)))
    if parsed.scheme == "s3":
        if parsed.username is not None or parsed.password is not None:
            raise InvalidConfig(
                "credentials do not belong in the store URL: use AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if not parsed.netloc or parsed.query or parsed.fragment:
            raise InvalidConfig(f"bad store URL {url!r}: use s3://bucket or s3://bucket/prefix")
        return S3Store(
            parsed.netloc, unquote(parsed.path).strip("/"), endpoint_url=endpoint_url, region=region
        )
    raise InvalidConfig(
        f"unsupported store URL {_without_password(url)!r}: use file:///path or s3://bucket/prefix"
    )


def slide_prefix(sha256: str, model_version: str, params_key: str) -> str:
    """Where one slide's outputs go; the same inputs always give the same keys."""
    return f"slides/{sha256}/{model_version}/{params_key}"


def store_from_settings(settings: Settings) -> ObjectStore:
    """The store the settings name: BLASTQ_STORE_URL with its S3 endpoint and region."""
    return open_store(
        settings.store_url, endpoint_url=settings.s3_endpoint_url or None, region=settings.s3_region or None
    )
