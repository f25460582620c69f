"""The storage interface every backend implements, and its shared types."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

_CHUNK = 1 << 20


class StorageError(Exception):
    """Base class of storage failures."""


class ConflictError(StorageError):
    """A key already holds different bytes; nothing was overwritten."""


@dataclass(frozen=True, slots=True)
class StorageUsage:
    """Space where the recordings are kept, in bytes (a bucket without a limit has none)."""

    total: int | None
    used: int
    free: int | None


@runtime_checkable
class StagingArea(Protocol):
    """A local directory of this process's own for downloads in progress.

    A download is written here, checked, and handed to `Storage.put_file`. The area of a
    process that died (however it died) is found and removed by the next one; `close()`
    removes this process's area at a clean exit.
    """

    @property
    def path(self) -> Path: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object in storage. `sha256` is None when `stat` did not read the bytes."""

    key: str
    size: int
    sha256: str | None
    modified_at: datetime


@dataclass(frozen=True, slots=True)
class ObjectLock:
    """What keeps a stored object from being deleted by the storage itself (S3 Object
    Lock): a retention `mode` (GOVERNANCE or COMPLIANCE) until `retain_until`, and a
    legal hold."""

    mode: str | None
    retain_until: datetime | None
    legal_hold: bool


@runtime_checkable
class Storage(Protocol):
    """Bytes by key (``serial/YYYY/MM/DD/name``): `LocalStorage` (a directory) and
    `S3Storage` (a bucket) implement it.

    Writes are atomic and durable: an object is either absent or complete, never partial.
    A key never silently changes content: writing different bytes to it raises
    `ConflictError`, writing the same bytes again is a no-op.
    """

    def put_file(
        self,
        key: str,
        src: Path,
        *,
        sha256: str | None = None,
        retain_until: datetime | None = None,
    ) -> StoredObject:
        """Move the finished file `src` into place under `key` (consumes `src`); where the
        storage `locks`, it refuses to delete the object before `retain_until`.

        `sha256` is that of `src`'s bytes, when the caller hashed them as it wrote them. A
        storage that `keeps_sha256` computes it when not given; one that does not needs it
        only to compare with a file already under `key`, and returns it as given (None if
        it was not)."""
        ...

    @property
    def keeps_sha256(self) -> bool:
        """Whether the storage keeps each object's SHA-256 with it (S3: the object's
        metadata), so that `put_file` needs one; False for a directory, where an object is
        hashed only when it is read back (`checksum`)."""
        ...

    @property
    def locks(self) -> bool:
        """Whether the storage itself can refuse deletions (a bucket with Object Lock);
        False for a directory, where callvault alone enforces retention."""
        ...

    def lock_state(self, key: str) -> ObjectLock | None:
        """The object's lock (None where the storage does not lock; FileNotFoundError if
        absent)."""
        ...

    def retain(self, key: str, until: datetime) -> None:
        """Keep the object from deletion until `until` (never shortens a lock)."""
        ...

    def legal_hold(self, key: str, on: bool) -> None:
        """Place (or lift) the storage's own legal hold on the object."""
        ...

    def put(self, key: str, stream: BinaryIO) -> StoredObject:
        """Store the bytes of `stream` under `key`."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Open the object for reading (raises FileNotFoundError if absent)."""
        ...

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """Open `length` bytes of the object from byte `start` (a player seeking): reading
        the result gives those bytes and then EOF (FileNotFoundError if absent)."""
        ...

    def stat(self, key: str) -> StoredObject | None:
        """Size and time of the object, or None if absent; `sha256` is None."""
        ...

    def checksum(self, key: str) -> StoredObject:
        """Read the whole object and return its size and SHA-256 (FileNotFoundError if
        absent): what `callvault verify` compares with the index."""
        ...

    def recorded_checksum(self, key: str) -> StoredObject | None:
        """Size and SHA-256 as the storage recorded them when the object was written,
        without reading it (an S3 object's metadata); None when it keeps none (a local
        file: `checksum` reads it). FileNotFoundError if absent."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with `prefix`, sorted."""
        ...

    def delete(self, key: str) -> bool:
        """Remove the object; False if it was absent."""
        ...

    def describe(self) -> str:
        """Where the recordings are kept, for people (a directory, a bucket URL)."""
        ...

    def locate(self, key: str) -> str:
        """Where the object is, for people and scripts (a file path, a bucket URL)."""
        ...

    def usage(self) -> StorageUsage | None:
        """The space used and left, or None when it cannot be told."""
        ...

    def check(self) -> str | None:
        """What keeps recordings from being stored now (one line), or None if nothing does:
        for readiness checks, quick and without writing."""
        ...

    def open_staging(self, tag: str) -> StagingArea:
        """A staging area of this process's own (see `StagingArea`), after removing the
        areas of processes that are gone. `tag` names it for people (host and pid)."""
        ...

    def clean_staging(self, older_than: timedelta) -> int:
        """Remove leftovers of crashed downloads older than `older_than`; how many."""
        ...


def sha256_of(stream: BinaryIO) -> tuple[str, int]:
    """SHA-256 (hex) and size of everything left in `stream`."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
