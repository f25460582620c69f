"""Verify: re-read archived recordings and compare them with their SHA-256 and size.

The same check for one recording (the call page's "Verify now", `POST
/api/recordings/{id}/verify`) and for the whole archive (`callvault verify`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from callvault.index import RecordingRow
from callvault.index.pbxs import PbxRecord
from callvault.index.retention import RetentionPolicy
from callvault.index.schema import ARCHIVED
from callvault.ops._archive import Archive
from callvault.ops._audio import RecordingUnreadable, open_recording
from callvault.ops._json import JsonResult
from callvault.storage import StorageError, StoredObject, UnsafeNameError


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
    # An encrypted recording that could not be decrypted (its file altered, truncated,
    # reordered or moved; or no master key that opens its data key): counted as mismatched.
    unreadable: bool = False


def verify_recording(
    archive: Archive, row: RecordingRow, *, now: datetime, deep: bool = True
) -> VerifyResult:
    """Compare the archived object of `row` with the index; note a match (`verified_at`).

    The bytes are read back and hashed, unless `deep` is False and the storage recorded
    the object's SHA-256 when it was written (an S3 bucket): then that record is compared,
    without downloading. An encrypted recording (`row.data_key`) is always read back and
    decrypted with the archive's keyring, every segment authenticated, and the plaintext
    hashed: the storage's record is the ciphertext's, the index's the plaintext's."""
    storage = archive.storage

    def result(
        ok: bool, actual: str | None, size: int | None, error: str | None, bad: bool = False
    ) -> VerifyResult:
        return VerifyResult(
            row.id, row.name, ok, row.sha256, actual, row.size, size, row.storage_key, error, bad
        )

    if row.state != ARCHIVED or row.storage_key is None:
        # A pending recording's key names where it will go, not a file.
        return result(False, None, None, "not archived")
    if row.data_key is not None:
        try:
            digest = hashlib.sha256()
            plain = 0
            for chunk in open_recording(storage, row, archive.keyring):
                digest.update(chunk)
                plain += len(chunk)
            stored = StoredObject(row.storage_key, plain, digest.hexdigest(), now)
        except RecordingUnreadable as exc:
            return result(False, None, None, f"cannot decrypt it: {exc}", bad=True)
        except (FileNotFoundError, NotADirectoryError):
            return result(False, None, None, "the archived file is missing from storage")
        except UnsafeNameError:
            return result(False, None, None, "the recording's storage key is not valid")
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            return result(False, None, None, f"cannot read it: {why}")
        except StorageError as exc:
            return result(False, None, None, f"cannot read it: {exc}")
        return _compared(archive, row, stored, now, result)
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
    return _compared(archive, row, stored, now, result)


def _compared(
    archive: Archive,
    row: RecordingRow,
    stored: StoredObject,
    now: datetime,
    result: Callable[[bool, str | None, int | None, str | None], VerifyResult],
) -> VerifyResult:
    if stored.sha256 != row.sha256 or (row.size is not None and stored.size != row.size):
        return result(
            False, stored.sha256, stored.size, "the file's bytes differ from the archived checksum"
        )
    archive.index.recordings.mark_verified(row.id, now)
    return result(True, stored.sha256, stored.size, None)


@dataclass(frozen=True, slots=True)
class LockProblem(JsonResult):
    """An object whose storage lock (S3 Object Lock) disagrees with callvault's rules:
    retained less long than its retention policy says, or its legal hold not matching
    callvault's holds. `fixed` when `relock` set it right."""

    id: int
    name: str
    storage_key: str
    problem: str
    fixed: bool = False


@dataclass(frozen=True, slots=True)
class VerifyReport(JsonResult):
    """The whole archive checked: `mismatched`, `missing` and `locks` not fixed are
    problems (`callvault verify` exits 1); `unindexed` files are in storage but no
    archived recording points to them (a crash between storing and indexing leaves one;
    the next attempt reuses it)."""

    checked: int
    ok: int
    mismatched: list[VerifyResult] = field(default_factory=list)
    missing: list[VerifyResult] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)
    locks: list[LockProblem] = field(default_factory=list)

    @property
    def problems(self) -> int:
        unfixed = [lock for lock in self.locks if not lock.fixed]
        return len(self.mismatched) + len(self.missing) + len(unfixed)


def verify_archive(
    archive: Archive,
    *,
    now: datetime,
    progress: Callable[[VerifyResult], None] | None = None,
    pbx: PbxRecord | None = None,
    deep: bool = False,
    relock: bool = False,
) -> VerifyReport:
    """Verify every archived recording (of `pbx` only, if given; `deep`: see
    `verify_recording`), and where the storage locks, that its lock agrees with the
    retention policy and the holds (`relock`: set it right where it can be: a retention
    date extended, a legal hold placed or lifted); then list the stored files nobody
    points to (for one PBX: those under its serial, if it is known)."""
    checked = ok = 0
    mismatched: list[VerifyResult] = []
    missing: list[VerifyResult] = []
    locks: list[LockProblem] = []
    known: set[str] = set()
    locking = archive.storage.locks
    policy = archive.index.retention.current() if locking else None
    for row in archive.index.recordings.archived(pbx_id=pbx.id if pbx is not None else None):
        checked += 1
        if row.storage_key:
            known.add(row.storage_key)
        outcome = verify_recording(archive, row, now=now, deep=deep)
        if outcome.ok:
            ok += 1
        elif outcome.actual_sha256 is not None or outcome.unreadable:
            mismatched.append(outcome)
        else:
            missing.append(outcome)
        if locking and outcome.ok and row.storage_key:
            locks += _lock_problems(archive, row, policy, relock=relock)
        if progress is not None:
            progress(outcome)
    storage = archive.storage
    if pbx is None:
        listed = list(storage.list())
    else:
        listed = list(storage.list(f"{pbx.serial}/")) if pbx.serial else []
    unindexed = [key for key in listed if key not in known]
    return VerifyReport(checked, ok, mismatched, missing, unindexed, locks)


def _lock_problems(
    archive: Archive, row: RecordingRow, policy: RetentionPolicy | None, *, relock: bool
) -> list[LockProblem]:
    """How the object's lock disagrees with the policy and the holds (fixed if asked)."""
    storage, key = archive.storage, row.storage_key or ""
    try:
        state = storage.lock_state(key)
    except (OSError, StorageError) as exc:
        return [LockProblem(row.id, row.name, key, f"its lock cannot be read: {exc}")]
    if state is None:
        return []
    found: list[LockProblem] = []
    expiry = archive.index.retention.expiry_for(row.id, policy)
    if expiry is not None and (state.retain_until is None or state.retain_until < expiry):
        kept = f"{state.retain_until:%Y-%m-%d}" if state.retain_until else "no date"
        problem = f"locked until {kept}, but its policy keeps it until {expiry:%Y-%m-%d}"
        found.append(_fix(row, key, problem, relock, lambda: storage.retain(key, expiry)))
    held = archive.index.retention.is_held(row.id)
    if held != state.legal_hold:
        problem = (
            "held in callvault but the bucket's legal hold is off"
            if held
            else "the bucket's legal hold is on but no hold in callvault keeps it"
        )
        found.append(_fix(row, key, problem, relock, lambda: storage.legal_hold(key, held)))
    return found


def _fix(
    row: RecordingRow, key: str, problem: str, relock: bool, action: Callable[[], None]
) -> LockProblem:
    if not relock:
        return LockProblem(row.id, row.name, key, problem)
    try:
        action()
    except (OSError, StorageError) as exc:
        return LockProblem(row.id, row.name, key, f"{problem}; not fixed: {exc}")
    return LockProblem(row.id, row.name, key, problem, fixed=True)
