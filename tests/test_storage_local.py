"""LocalStorage on a real directory: atomic durable puts, conflicts, listing, staging."""

from __future__ import annotations

import hashlib
import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callvault.storage import (
    STAGING_NAME,
    ConflictError,
    LocalStorage,
    Storage,
    UnsafeNameError,
)

KEY = "SN1/2024/05/01/20240501120000-1714564800.1-1001-1002-Internal.wav"
AUDIO = b"RIFF" + bytes(range(256)) * 40


def staged(storage: LocalStorage, data: bytes, name: str = "dl.part") -> Path:
    path = storage.staging_dir() / name
    path.write_bytes(data)
    return path


def test_is_a_storage(tmp_path: Path) -> None:
    assert isinstance(LocalStorage(tmp_path), Storage)


def test_put_file_moves_bytes_into_place(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    src = staged(storage, AUDIO)
    stored = storage.put_file(KEY, src)
    assert stored.sha256 is None  # not given, and a directory does not keep hashes
    assert stored.size == len(AUDIO)
    final = tmp_path / KEY
    assert final.read_bytes() == AUDIO
    assert not src.exists()
    assert os.stat(final).st_nlink == 1
    assert list(storage.staging_dir().iterdir()) == []
    with storage.open(KEY) as handle:
        assert handle.read() == AUDIO
    info = storage.stat(KEY)
    assert info is not None and info.size == len(AUDIO) and info.sha256 is None
    assert storage.checksum(KEY).sha256 == hashlib.sha256(AUDIO).hexdigest()


def test_same_bytes_again_is_a_noop_different_bytes_conflict(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = storage.put(KEY, io.BytesIO(AUDIO))
    again = storage.put_file(KEY, staged(storage, AUDIO))
    assert again.sha256 == first.sha256
    other = staged(storage, AUDIO + b"x", "other.part")
    with pytest.raises(ConflictError):
        storage.put_file(KEY, other)
    assert (tmp_path / KEY).read_bytes() == AUDIO
    assert other.read_bytes() == AUDIO + b"x"  # left for the caller to inspect
    with pytest.raises(ConflictError):
        storage.put(KEY, io.BytesIO(b"RIFFdifferent"))
    assert (tmp_path / KEY).read_bytes() == AUDIO
    assert sorted(p.name for p in storage.staging_dir().iterdir()) == ["other.part"]


def test_put_file_from_another_directory(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    src = tmp_path / "elsewhere.wav"
    src.write_bytes(AUDIO)
    stored = storage.put_file(KEY, src, sha256=hashlib.sha256(AUDIO).hexdigest())
    assert stored.size == len(AUDIO)
    assert (tmp_path / "root" / KEY).read_bytes() == AUDIO
    assert not src.exists()


def test_list_skips_staging_own_files_hidden_and_odd_names(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    keys = [KEY, "SN1/2024/05/02/b.wav", "SN2/2023/01/01/c.wav"]
    for key in keys:
        storage.put(key, io.BytesIO(key.encode()))
    staged(storage, b"partial")
    (tmp_path / "callvault.db").write_bytes(b"db")
    (tmp_path / "callvault.db-wal").write_bytes(b"wal")
    (tmp_path / "SN1" / ".DS_Store").write_bytes(b"")
    (tmp_path / "SN1" / "has space.wav").write_bytes(b"")
    assert list(storage.list()) == sorted(keys)
    assert list(storage.list("SN1/")) == sorted(keys[:2])
    assert storage.delete(keys[1])
    assert not storage.delete(keys[1])
    assert list(storage.list("SN1/")) == [KEY]
    assert storage.stat(keys[1]) is None


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    storage = LocalStorage(root)
    (root / "SN1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeNameError):
        storage.put(KEY, io.BytesIO(AUDIO))
    with pytest.raises(UnsafeNameError):
        storage.open(KEY)
    assert list(outside.iterdir()) == []


def test_staging_key_cannot_be_written_and_is_hidden(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert storage.staging_dir() == tmp_path.resolve() / STAGING_NAME
    assert storage.staging_dir().stat().st_mode & 0o777 == 0o700
    with pytest.raises(UnsafeNameError):
        storage.put(f"{STAGING_NAME}/x.wav", io.BytesIO(AUDIO))


def test_clean_staging_removes_only_old_leftovers(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    old = staged(storage, b"old", "old.part")
    fresh = staged(storage, b"new", "new.part")
    now = datetime.now(UTC)
    old_time = (now - timedelta(hours=2)).timestamp()
    os.utime(old, (old_time, old_time))
    assert storage.clean_staging(timedelta(hours=1), now=now) == 1
    assert not old.exists() and fresh.exists()
    assert storage.clean_staging(timedelta(hours=1), now=now + timedelta(hours=2)) == 1
    assert list(storage.staging_dir().iterdir()) == []


def test_files_are_readable_by_the_owner_group_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put(KEY, io.BytesIO(AUDIO))
    assert (tmp_path / KEY).stat().st_mode & 0o777 == 0o640


def test_open_range_reads_exactly_the_bytes_asked_for(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put_file(KEY, staged(storage, AUDIO))
    with storage.open_range(KEY, 10, 100) as part:
        assert part.read() == AUDIO[10:110]
    with storage.open_range(KEY, len(AUDIO) - 5, 100) as tail:
        assert tail.read(3) + tail.read() == AUDIO[-5:]
    with storage.open_range(KEY, 0, 0) as nothing:
        assert nothing.read() == b""
    with pytest.raises(FileNotFoundError):
        storage.open_range("SN1/2024/05/01/absent.wav", 0, 10)


def test_locate_and_usage_describe_where_recordings_are(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert storage.locate(KEY) == str(tmp_path.resolve().joinpath(*KEY.split("/")))
    usage = storage.usage()
    assert usage is not None and usage.total is not None and usage.free is not None
    assert 0 < usage.used <= usage.total and usage.free <= usage.total


def test_staging_areas_are_per_process_and_a_gone_ones_is_removed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = storage.open_staging("host-1/../x")
    assert first.path.parent == storage.staging_dir() and first.path.name.startswith("proc-")
    assert "/" not in first.path.name.removeprefix("proc-")
    (first.path / "partial.wav").write_bytes(b"RIFF")
    # While its lock is held (the process lives) the next process leaves it alone...
    second = storage.open_staging("host-2")
    assert first.path.is_dir()
    # ...once it lets go (it died: the kernel drops the lock), the next one removes it.
    os.close(first._fd)  # type: ignore[attr-defined, arg-type]  # what dying does
    third = storage.open_staging("host-3")
    assert not first.path.exists()
    second.close()
    second.close()  # idempotent
    assert not second.path.exists()
    assert sorted(storage.staging_dir().iterdir()) == [third.path]
    third.close()


def test_a_new_archive_directory_is_the_owners_alone(tmp_path: Path) -> None:
    LocalStorage(tmp_path / "new" / "archive")
    assert (tmp_path / "new" / "archive").stat().st_mode & 0o777 == 0o700
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    LocalStorage(existing)
    assert existing.stat().st_mode & 0o777 == 0o755
