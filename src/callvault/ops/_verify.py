"""Verify: re-read archived recordings and compare them with their SHA-256 and size.

The same check for one recording (the call page's "Verify now", `POST
/api/recordings/{id}/verify`) and for the whole archive (`callvault verify`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from callvault.index import RecordingRow
from callvault.index.pbxs import PbxRecord
from callvault.index.schema import ARCHIVED
from callvault.ops._archive import Archive
from callvault.ops._json import JsonResult
from callvault.storage import StorageError, UnsafeNameError


@dataclass(frozen=True, slots=True)
class VerifyResult(JsonResult):
    """One recording checked. `ok` only if its bytes hash to the archived SHA-256 and
    their count is the archived size; `error` says what is wrong otherwise."""

    id: int
    name: str
    ok: bool
    expected_sha256: str | None
    actual_sha256: str | None
    expected_size: int | None
    actual_size: int | None
    storage_key: str | None
    error: str | None = None


def verify_recording(
    archive: Archive, row: RecordingRow, *, now: datetime, deep: bool = True
) -> VerifyResult:
    """Compare the archived object of `row` with the index; note a match (`verified_at`).

    The bytes are read back and hashed, unless `deep` is False and the storage recorded
    the object's SHA-256 when it was written (an S3 bucket): then that record is compared,
    without downloading."""
    storage = archive.storage

    def result(ok: bool, actual: str | None, size: int | None, error: str | None) -> VerifyResult:
        return VerifyResult(
            row.id, row.name, ok, row.sha256, actual, row.size, size, row.storage_key, error
        )

    if row.state != ARCHIVED or row.storage_key is None:
        # A pending recording's key names where it will go, not a file.
        return result(False, None, None, "not archived")
    try:
        recorded = None if deep else storage.recorded_checksum(row.storage_key)
        stored = recorded if recorded is not None else storage.checksum(row.storage_key)
    except (FileNotFoundError, NotADirectoryError):
        return result(False, None, None, "the archived file is missing from storage")
    except UnsafeNameError:
        return result(False, None, None, "the recording's storage key is not valid")
    except OSError as exc:
        return result(False, None, None, f"cannot read it: {exc.strerror or type(exc).__name__}")
    except StorageError as exc:
        return result(False, None, None, f"cannot read it: {exc}")
    if stored.sha256 != row.sha256 or (row.size is not None and stored.size != row.size):
        return result(
            False, stored.sha256, stored.size, "the file's bytes differ from the archived checksum"
        )
    archive.index.recordings.mark_verified(row.id, now)
    return result(True, stored.sha256, stored.size, None)


@dataclass(frozen=True, slots=True)
class VerifyReport(JsonResult):
    """The whole archive checked: `mismatched` and `missing` are problems (`callvault
    verify` exits 1); `unindexed` files are in storage but no archived recording points to
    them (a crash between storing and indexing leaves one; the next attempt reuses it)."""

    checked: int
    ok: int
    mismatched: list[VerifyResult] = field(default_factory=list)
    missing: list[VerifyResult] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.mismatched) + len(self.missing)


def verify_archive(
    archive: Archive,
    *,
    now: datetime,
    progress: Callable[[VerifyResult], None] | None = None,
    pbx: PbxRecord | None = None,
    deep: bool = False,
) -> VerifyReport:
    """Verify every archived recording (of `pbx` only, if given; `deep`: see
    `verify_recording`), then list the stored files nobody points to (for one PBX: those
    under its serial, if it is known)."""
    checked = ok = 0
    mismatched: list[VerifyResult] = []
    missing: list[VerifyResult] = []
    known: set[str] = set()
    for row in archive.index.recordings.archived(pbx_id=pbx.id if pbx is not None else None):
        checked += 1
        if row.storage_key:
            known.add(row.storage_key)
        outcome = verify_recording(archive, row, now=now, deep=deep)
        if outcome.ok:
            ok += 1
        elif outcome.actual_sha256 is not None:
            mismatched.append(outcome)
        else:
            missing.append(outcome)
        if progress is not None:
            progress(outcome)
    storage = archive.storage
    if pbx is None:
        listed = list(storage.list())
    else:
        listed = list(storage.list(f"{pbx.serial}/")) if pbx.serial else []
    unindexed = [key for key in listed if key not in known]
    return VerifyReport(checked, ok, mismatched, missing, unindexed)
