"""Where an archive's recordings are: the storage URL a command is given, checked against
the one the index remembers, so that no command reads (or `serve` writes) the recordings
of one archive in two places.

The index remembers the URL (`SettingKey.STORAGE_URL`) once recordings go somewhere other
than the archive directory: the first `serve` or `backfill` given ``--storage`` on an
archive without archived recordings, or `callvault storage migrate`. From then on every
command finds them without ``--storage``; given one that differs, it refuses with one
line instead of looking in the wrong place.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from callvault.index import Index, SettingKey
from callvault.storage import parse_storage_url


class StorageMismatch(Exception):
    """The storage URL given is not where the index's recordings are. One line."""


def same_place(url: str | None, other: str | None, archive_dir: Path) -> bool:
    """Whether two storage URLs (None: the archive directory) name the same place."""
    return _canonical(url, archive_dir) == _canonical(other, archive_dir)


def _canonical(url: str | None, archive_dir: Path) -> str:
    if url is None or not url.strip():
        return f"file://{archive_dir.absolute()}"
    scheme, location, prefix = parse_storage_url(url)
    if scheme == "file":
        return f"file://{Path(location).absolute()}"
    return f"s3://{location}/{prefix}".rstrip("/")


def storage_url_for(
    index: Index, given: str | None, archive_dir: Path, *, adopt: bool = False
) -> str | None:
    """The storage URL to use: `given`, else the one the index remembers (None: the archive
    directory). With `adopt` (serve, backfill), a `given` URL on an index that remembers
    none and has nothing archived yet is remembered. StorageMismatch when `given` differs
    from where the index's recordings are."""
    saved = index.settings.get(SettingKey.STORAGE_URL)
    if given is None:
        return saved
    if saved is not None:
        if not same_place(given, saved, archive_dir):
            raise StorageMismatch(
                f"the recordings of this archive are in {saved}, not {given}: drop --storage, "
                f"or move them with `callvault storage migrate --to {given}`"
            )
        return given
    if same_place(given, None, archive_dir):
        return None
    if next(index.recordings.archived(batch=1), None) is not None:
        raise StorageMismatch(
            f"the recordings of this archive are in {archive_dir}, not {given}: move them "
            f"with `callvault storage migrate --to {given}`, or drop --storage"
        )
    if adopt:
        index.settings.set(SettingKey.STORAGE_URL, given, datetime.now(UTC))
    return given
