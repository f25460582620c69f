"""S3Storage: recordings as objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW,
Wasabi, Backblaze B2), with boto3.

Where and as whom: the bucket and key prefix come from the storage URL
(``s3://BUCKET/PREFIX``); the endpoint, region and credentials the standard AWS ways
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and its config files, instance roles), which boto3 reads by itself.

Writing: a recording is uploaded from the verified file in the local staging area with
``upload_file`` (multipart above 16 MiB, in parts of 16 MiB, so memory stays the same
whatever the size), with an SHA-256 checksum of each request that the server checks
(``x-amz-checksum-sha256``; a part corrupted on the way is refused), and the whole file's
SHA-256 kept as the object's metadata (``x-amz-meta-sha256``). It counts as stored only
once a HEAD of the object confirms its size and that metadata. A key holding different
bytes is a `ConflictError`, the same bytes again a no-op, as on local disk.

Reading: ranged GETs for playback; `recorded_checksum` gives the upload's SHA-256
without downloading (``callvault verify``), `checksum` downloads and hashes
(``verify --deep``).

The staging area of downloads in progress stays on local disk (the archive directory):
a download is checked before anything reaches the bucket.

Object Lock: on a bucket made with Object Lock enabled, each recording is uploaded with
a retention date (its retention policy's expiry) in the bucket's default retention mode
(GOVERNANCE if it has none), and a legal hold placed in callvault becomes the object's
legal hold, so that the bucket itself refuses to delete it early, whoever asks.
Deleting then removes every version of the key (a plain DELETE would only hide it).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

from callvault.storage._base import (
    ConflictError,
    ObjectLock,
    StorageError,
    StorageUsage,
    StoredObject,
    sha256_of,
)
from callvault.storage._local import LocalStagingArea, LocalStorage
from callvault.storage._names import check_key

T = TypeVar("T")

# Uploads above this go in parts of this size: memory stays the same whatever the size.
PART_SIZE = 16 * 1024 * 1024
_META_SHA256 = "sha256"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class S3Storage:
    """A bucket (and key prefix) as `Storage`; see the module docstring."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        work_dir: Path,
        client: Any = None,
        part_size: int = PART_SIZE,
    ) -> None:
        if not bucket:
            raise StorageError("an s3:// storage URL needs a bucket: s3://BUCKET/PREFIX")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._part_size = part_size
        # Downloads in progress are staged on local disk, as with local storage.
        self._local = LocalStorage(work_dir)
        self._client = client
        self._lock_mode: str | None = None  # the bucket's (None: not looked up yet)

    def __repr__(self) -> str:
        return f"S3Storage({self.describe()!r})"

    @property
    def client(self) -> Any:
        """The boto3 client (made on first use: importing boto3 takes a while)."""
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise StorageError(
                    f"storing in {self.describe()} needs boto3: pip install 'callvault[s3]'"
                ) from None

            config = Config(
                retries={"mode": "standard", "max_attempts": 4},
                request_checksum_calculation="when_supported",
                response_checksum_validation="when_supported",
            )
            self._client = boto3.client("s3", config=config)
        return self._client

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run one request; FileNotFoundError for a missing object, else StorageError
        (one line) for anything the server or the network says."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return operation()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND and code != "NoSuchBucket":
                raise FileNotFoundError(what) from None
            message = error.get("Message") or code
            raise StorageError(f"{what}: {self.describe()} answered {code}: {message}") from None
        except NoCredentialsError:
            raise StorageError(
                f"{what}: no credentials for {self.describe()}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        except (BotoCoreError, Boto3Error) as exc:  # Boto3Error: a failed multipart upload
            reason = " ".join(str(exc).split())
            raise StorageError(f"{what}: {self.describe()}: {reason}") from None

    # -- Object Lock -----------------------------------------------------------------------

    def _bucket_lock_mode(self) -> str:
        """The retention mode objects get ("" when the bucket has no Object Lock)."""
        if self._lock_mode is None:
            try:
                answer = self._call(
                    "reading the bucket's Object Lock configuration",
                    lambda: self.client.get_object_lock_configuration(Bucket=self.bucket),
                )
            except StorageError as exc:
                if "ObjectLockConfigurationNotFound" not in str(exc):
                    raise
                answer = {}
            except FileNotFoundError:
                answer = {}
            config = answer.get("ObjectLockConfiguration") or {}
            if config.get("ObjectLockEnabled") != "Enabled":
                self._lock_mode = ""
            else:
                default = (config.get("Rule") or {}).get("DefaultRetention") or {}
                self._lock_mode = str(default.get("Mode") or "GOVERNANCE")
        return self._lock_mode

    @property
    def locks(self) -> bool:
        return bool(self._bucket_lock_mode())

    # The whole object's SHA-256 is its metadata (``x-amz-meta-sha256``).
    keeps_sha256 = True

    def lock_state(self, key: str) -> ObjectLock | None:
        if not self.locks:
            return None
        full = self._full(key)
        head = self._call(
            f"looking up {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=full)
        )
        until = head.get("ObjectLockRetainUntilDate")
        return ObjectLock(
            mode=head.get("ObjectLockMode"),
            retain_until=until if isinstance(until, datetime) else None,
            legal_hold=head.get("ObjectLockLegalHoldStatus") == "ON",
        )

    def retain(self, key: str, until: datetime) -> None:
        mode = self._bucket_lock_mode()
        if not mode:
            return
        current = self.lock_state(key)
        if current is not None and current.retain_until and current.retain_until >= until:
            return  # never shortened
        full = self._full(key)
        self._call(
            f"locking {key}",
            lambda: self.client.put_object_retention(
                Bucket=self.bucket,
                Key=full,
                Retention={"Mode": mode, "RetainUntilDate": until},
            ),
        )

    def legal_hold(self, key: str, on: bool) -> None:
        if not self.locks:
            return
        full = self._full(key)
        self._call(
            f"{'placing' if on else 'lifting'} the legal hold of {key}",
            lambda: self.client.put_object_legal_hold(
                Bucket=self.bucket, Key=full, LegalHold={"Status": "ON" if on else "OFF"}
            ),
        )

    # -- writing ---------------------------------------------------------------------------

    def put_file(
        self,
        key: str,
        src: Path,
        *,
        sha256: str | None = None,
        retain_until: datetime | None = None,
    ) -> StoredObject:
        """Upload the complete file `src` under `key` (see the module docstring); `src` is
        removed once the object is confirmed."""
        full = self._full(key)
        with src.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if sha256 is None:
                sha256, size = sha256_of(handle)
        existing = self._head(key)
        if existing is not None:
            if existing.size == size and existing.sha256 == sha256:
                src.unlink()
                return existing
            raise ConflictError(f"{key} already holds different bytes")
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(
            multipart_threshold=self._part_size,
            multipart_chunksize=self._part_size,
            max_concurrency=4,
            use_threads=True,
        )
        extra: dict[str, Any] = {
            "ChecksumAlgorithm": "SHA256",
            "Metadata": {_META_SHA256: sha256},
            "ContentType": _content_type(key),
        }
        mode = self._bucket_lock_mode() if retain_until is not None else ""
        if mode:
            extra["ObjectLockMode"] = mode
            extra["ObjectLockRetainUntilDate"] = retain_until
        self._call(
            f"uploading {key}",
            lambda: self.client.upload_file(
                str(src), self.bucket, full, ExtraArgs=extra, Config=transfer
            ),
        )
        stored = self._head(key)
        if stored is None or stored.size != size or stored.sha256 != sha256:
            raise StorageError(
                f"uploading {key}: the bucket does not hold what was sent "
                f"({size} bytes, sha256 {sha256}); it will be tried again"
            )
        src.unlink()
        return stored

    def put(self, key: str, stream: BinaryIO) -> StoredObject:
        """Store everything read from `stream` under `key` (staged locally first)."""
        check_key(key)
        area = self._local.open_staging(f"put-{os.getpid()}")
        try:
            temp = area.path / "put.part"
            digest = hashlib.sha256()
            with temp.open("wb") as out:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            return self.put_file(key, temp, sha256=digest.hexdigest())
        finally:
            area.close()

    def delete(self, key: str) -> bool:
        """Remove the object; False if it was absent. On a bucket with Object Lock every
        version of the key is removed (StorageError, naming the lock, while it holds)."""
        if self._head(key) is None:
            return False
        full = self._full(key)
        if not self.locks:
            self._call(
                f"deleting {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=full)
            )
            return True
        listed = self._call(
            f"listing the versions of {key}",
            lambda: self.client.list_object_versions(Bucket=self.bucket, Prefix=full),
        )
        versions = [
            str(item["VersionId"])
            for group in ("Versions", "DeleteMarkers")
            for item in listed.get(group) or []
            if item.get("Key") == full
        ]
        for version in versions:
            try:
                self._call(
                    f"deleting {key}",
                    lambda version=version: self.client.delete_object(  # type: ignore[misc]
                        Bucket=self.bucket, Key=full, VersionId=version
                    ),
                )
            except StorageError as exc:
                if "AccessDenied" in str(exc):
                    raise StorageError(
                        f"deleting {key}: the bucket's Object Lock keeps it (a retention date "
                        "not reached, or a legal hold)"
                    ) from None
                raise
        return True

    # -- reading ---------------------------------------------------------------------------

    def _head(self, key: str) -> StoredObject | None:
        full = self._full(key)
        try:
            head = self._call(
                f"looking up {key}",
                lambda: self.client.head_object(Bucket=self.bucket, Key=full),
            )
        except FileNotFoundError:
            return None
        metadata = {str(k).lower(): str(v) for k, v in (head.get("Metadata") or {}).items()}
        modified = head.get("LastModified")
        return StoredObject(
            key=key,
            size=int(head["ContentLength"]),
            sha256=metadata.get(_META_SHA256),
            modified_at=modified if isinstance(modified, datetime) else datetime.now(UTC),
        )

    def open(self, key: str) -> BinaryIO:
        """The object's bytes as a stream (FileNotFoundError if absent)."""
        full = self._full(key)
        answer = self._call(
            f"reading {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=full)
        )
        return cast(BinaryIO, _Body(answer["Body"]))

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """`length` bytes of the object from byte `start`, by a ranged GET."""
        if start < 0 or length < 0:
            raise ValueError("a range starts and ends inside the object")
        full = self._full(key)
        if length == 0:
            if self._head(key) is None:
                raise FileNotFoundError(key)
            return io.BytesIO(b"")
        last = start + length - 1
        answer = self._call(
            f"reading {key}",
            lambda: self.client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={start}-{last}"
            ),
        )
        return cast(BinaryIO, _Body(answer["Body"]))

    def stat(self, key: str) -> StoredObject | None:
        """Size and time of the object, or None if absent; `sha256` is None."""
        stored = self._head(key)
        if stored is None:
            return None
        return StoredObject(stored.key, stored.size, None, stored.modified_at)

    def recorded_checksum(self, key: str) -> StoredObject | None:
        """Size and SHA-256 as recorded when the object was uploaded (its metadata),
        without reading it; None if absent (FileNotFoundError) or recorded without one."""
        stored = self._head(key)
        if stored is None:
            raise FileNotFoundError(key)
        return stored if stored.sha256 is not None else None

    def checksum(self, key: str) -> StoredObject:
        """Download the whole object and hash it (FileNotFoundError if absent)."""
        stored = self._head(key)
        if stored is None:
            raise FileNotFoundError(key)
        with self.open(key) as handle:
            digest, size = sha256_of(handle)
        return StoredObject(key=key, size=size, sha256=digest, modified_at=stored.modified_at)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with `prefix`, sorted."""
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []

        def collect() -> None:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                keys.extend(str(item["Key"])[len(base) :] for item in page.get("Contents", []))

        self._call("listing the bucket", collect)
        yield from sorted(keys)

    # -- describing ------------------------------------------------------------------------

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def locate(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def usage(self) -> StorageUsage | None:
        return None  # a bucket has no size to fill

    def check(self) -> str | None:
        """None if the bucket answers; else why not, in one line."""
        try:
            self._call("checking the bucket", lambda: self.client.head_bucket(Bucket=self.bucket))
        except FileNotFoundError:
            return f"the bucket {self.bucket} does not exist"
        except StorageError as exc:
            return str(exc)
        return self._local.check()

    # -- the local staging area ------------------------------------------------------------

    def open_staging(self, tag: str) -> LocalStagingArea:
        return self._local.open_staging(tag)

    def clean_staging(self, older_than: timedelta) -> int:
        return self._local.clean_staging(older_than)


class _Body(io.RawIOBase):
    """A response body as a binary file (read, readinto, close, context manager)."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return bytes(self._body.read())
        return bytes(self._body.read(size))

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _content_type(key: str) -> str:
    lowered = key.lower()
    if lowered.endswith(".wav"):
        return "audio/x-wav"
    if lowered.endswith(".mp3"):
        return "audio/mpeg"
    return "application/octet-stream"


def parse_storage_url(url: str) -> tuple[str, str, str]:
    """(scheme, location, prefix) of a storage URL: ("file", DIRECTORY, "") or ("s3",
    BUCKET, PREFIX). ValueError (one line) for anything else."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"{text!r}: a file storage URL is file:///ABSOLUTE/DIRECTORY")
        return "file", parts.path, ""
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{text!r}: an S3 storage URL is s3://BUCKET/PREFIX")
        prefix = parts.path.strip("/")
        if prefix:
            check_key(prefix + "/x")
        return "s3", parts.netloc, prefix
    raise ValueError(
        f"{text!r:.80} is not a storage URL: give file:///DIRECTORY or s3://BUCKET/PREFIX"
    )
