"""`callvault storage migrate`: copy an archive's recordings into another storage (a
bucket), verified, resumable, then switch the index over to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from callvault.index import SettingKey, audit
from callvault.ops._archive import Archive
from callvault.ops._json import JsonResult
from callvault.storage import ConflictError, Storage, StorageError, StoredObject

AUDIT_ACTION = audit.STORAGE_MIGRATE


@dataclass(frozen=True, slots=True)
class MigrationFailure:
    """A recording that could not be copied, and why."""

    name: str
    storage_key: str
    error: str


@dataclass(frozen=True, slots=True)
class MigrationReport(JsonResult):
    """What a migration did. `switched`: the index now reads the recordings from `target`
    (only when every one is there, verified)."""

    source: str
    target: str
    recordings: int
    copied: int
    already_there: int
    failed: list[MigrationFailure] = field(default_factory=list)
    switched: bool = False


def migrate_storage(
    archive: Archive,
    target: Storage,
    target_url: str,
    *,
    actor: str,
    now: Callable[[], datetime],
    progress: Callable[[int, int], None] | None = None,
) -> MigrationReport:
    """Copy every archived recording from the archive's storage into `target` and check
    each copy against the index's size and SHA-256. Copies already there and right are
    skipped (a second run resumes). When all are there, the index remembers `target_url`
    (`SettingKey.STORAGE_URL`): from then on every command and node reads and writes
    there. The source is left as it was. ArchiveError (one line) if a serve is running:
    what it archived meanwhile would stay behind."""
    index, source = archive.index, archive.storage
    archive.refuse_while_serving(now(), "the recordings it archives meanwhile stay behind")
    total = index.recordings.counts_by_state(["archived"]).get("archived", 0)
    copied = already = done = 0
    failed: list[MigrationFailure] = []
    for row in index.recordings.archived():
        done += 1
        key = row.storage_key or ""
        try:
            # An encrypted recording's file is compared with the source's ciphertext (the
            # index holds the plaintext's hash): the bytes are copied as they are.
            size, sha256 = row.size, row.sha256
            if row.data_key is not None:
                original = source.checksum(key)
                size, sha256 = original.size, original.sha256
            present = _present(target, key)
            if present is not None and _matches(present, size, sha256):
                already += 1
            else:
                with source.open(key) as stream:
                    stored = target.put(key, stream)
                if not _matches(stored, size, sha256):
                    failed.append(
                        MigrationFailure(
                            row.name,
                            key,
                            f"the copy has sha256 {stored.sha256}, size {stored.size}; "
                            f"{'the source has' if row.data_key else 'the index says'} "
                            f"{sha256}, {size} (run `callvault verify`)",
                        )
                    )
                else:
                    copied += 1
        except FileNotFoundError:
            failed.append(MigrationFailure(row.name, key, "missing from the archive's storage"))
        except ConflictError:
            failed.append(MigrationFailure(row.name, key, "the target holds other bytes there"))
        except (StorageError, OSError, ValueError) as exc:
            failed.append(MigrationFailure(row.name, key, str(exc) or type(exc).__name__))
        if progress is not None:
            progress(done, total)
    switched = not failed
    report = MigrationReport(
        source=source.describe(),
        target=target.describe(),
        recordings=done,
        copied=copied,
        already_there=already,
        failed=failed,
        switched=switched,
    )
    if switched:
        index.settings.set(SettingKey.STORAGE_URL, target_url, now())
    index.audit.record(
        actor,
        AUDIT_ACTION,
        target.describe(),
        f"{copied} copied, {already} already there, {len(failed)} failed; "
        + ("switched" if switched else "not switched"),
        "",
    )
    return report


def _present(target: Storage, key: str) -> StoredObject | None:
    try:
        recorded = target.recorded_checksum(key)
    except FileNotFoundError:
        return None
    return recorded if recorded is not None else target.checksum(key)


def _matches(stored: StoredObject, size: int | None, sha256: str | None) -> bool:
    return stored.sha256 == sha256 and (size is None or stored.size == size)
