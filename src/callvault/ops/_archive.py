"""An archive opened for reading and managing: its index and its storage, together."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from callvault.archive import NODE_KIND, StorageMismatch, storage_url_for
from callvault.index import Index, IndexMissingError, IndexOpenError, SettingKey, open_index
from callvault.keys import Keyring
from callvault.storage import Storage, open_storage_url

# A serve whose heartbeat is younger than this is taken as running.
_RUNNING_WITHIN = timedelta(seconds=30)


class ArchiveError(Exception):
    """The archive cannot be opened; the message is one line saying what to do."""


@dataclass
class Archive:
    """An open archive. Close it (or use it as a context manager) to release the index."""

    index: Index
    storage: Storage
    # The master keys, where the caller loaded them: they open the data keys of encrypted
    # recordings (`callvault.ops._audio`); None: encrypted recordings cannot be read.
    keyring: Keyring | None = field(default=None, repr=False)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def saved_timezone(self) -> ZoneInfo | None:
        """The PBX's time zone as serve/backfill saved it (None if never, or unknown)."""
        name = self.index.settings.get(SettingKey.PBX_TIMEZONE)
        if not name:
            return None
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            return None

    def refuse_while_serving(self, now: datetime, why: str) -> None:
        """ArchiveError naming the nodes if a `serve` works on this archive now (a
        heartbeat within 30 s): `why` says what its work meanwhile would spoil."""
        running = [
            info.node
            for info in self.index.processes.live(now=now, stale_after=_RUNNING_WITHIN)
            if info.kind in ("serve", NODE_KIND)
        ]
        if running:
            raise ArchiveError(
                f"serve is running (node {', '.join(sorted(set(running)))}): stop it on every "
                f"node first, or {why}"
            )

    def saved_json(self, key: SettingKey) -> Any:
        """A setting holding JSON (the PBX session health), parsed; its text if not JSON."""
        text = self.index.settings.get(key)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text


def open_archive(
    directory: Path,
    db_url: str,
    *,
    create: bool = False,
    storage_url: str | None = None,
    keyring: Keyring | None = None,
) -> Archive:
    """Open an EXISTING archive directory's index and storage.

    With `create`, a directory without an index yet gets an empty one (users can be added
    before anything is archived); without it, a missing index is an `ArchiveError` saying
    how to make one. `storage_url` names where the recordings are (None: `directory`);
    `keyring` opens encrypted recordings.
    Every failure is one line (`ArchiveError`); a damaged index raises
    `callvault.index.IndexCorruptError` (also one line) when it is first read.
    """
    if not directory.is_dir():
        raise ArchiveError(f"archive directory {directory} does not exist (check --archive)")
    try:
        index = open_index(db_url, create=create)
    except IndexMissingError as exc:
        raise ArchiveError(
            f"{exc}: nothing archived yet (run `callvault serve` or `callvault backfill`)"
        ) from None
    except IndexOpenError as exc:
        raise ArchiveError(str(exc)) from None
    try:
        storage = open_storage_url(storage_url_for(index, storage_url, directory), directory)
    except (ValueError, StorageMismatch) as exc:
        index.close()
        raise ArchiveError(str(exc)) from None
    except OSError as exc:
        index.close()
        raise ArchiveError(
            f"cannot use the archive directory {directory}: {exc.strerror}"
        ) from None
    return Archive(index=index, storage=storage, keyring=keyring)
