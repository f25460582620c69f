"""`LocalStorage`: recordings as plain files under one root directory.

Layout: ``ROOT/<serial>/<YYYY>/<MM>/<DD>/<name>``, plus ``ROOT/.callvault-incoming/`` for
downloads in progress (hidden, on the same filesystem so finishing one is a rename) and
top-level names starting with ``callvault.`` for callvault's own files (the index).

Durability: a file is fsynced, then hard-linked into place (which also refuses to replace
an existing file, atomically), then its directory is fsynced; new directories are fsynced
into their parents. After a crash a key holds either nothing or the complete file.

Each downloading process works in a directory of its own inside the staging area and
holds an exclusive `flock` on the ``.lock`` file in it for as long as it runs
(`new_process_staging_dir`). The kernel drops the lock when the process dies however it
dies, so a directory whose lock can be taken is a dead process's leftovers, whatever its
pid has become since (pids are reused; in a container `serve` is often pid 1).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import stat as stat_module
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from uuid import uuid4

from callvault.storage._base import (
    _CHUNK,
    ConflictError,
    ObjectLock,
    Storage,
    StorageUsage,
    StoredObject,
    sha256_of,
)
from callvault.storage._names import RESERVED_PREFIX, UnsafeNameError, check_key

log = logging.getLogger("callvault.storage")

STAGING_NAME = ".callvault-incoming"
# In each process's staging directory: the file whose flock says the process is alive.
STAGING_LOCK = ".lock"
# Process staging directories are named PROCESS_PREFIX + a tag + a random part; they are
# built under a SETUP_PREFIX name and renamed once their lock is held.
PROCESS_PREFIX = "proc-"
_SETUP_PREFIX = ".setup-"
_FILE_MODE = 0o640


def try_lock_staging_dir(directory: Path) -> int | None:
    """Take the lock of a process staging directory without waiting.

    Returns the open file descriptor holding the lock (close it to let go), or None when
    a live process holds it. Raises FileNotFoundError when the directory has no lock file
    (made by an older callvault, or not a process directory).
    """
    fd = os.open(directory / STAGING_LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class LocalStagingArea:
    """A process's own staging directory and the descriptor of the lock it holds on it."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self._path = path
        self._fd: int | None = lock_fd

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Remove the directory (a clean exit), then let go of its lock; idempotent."""
        fd, self._fd = self._fd, None  # taken first: two threads closing close it once
        if fd is None:
            return
        shutil.rmtree(self._path, ignore_errors=True)
        os.close(fd)

    def __repr__(self) -> str:
        return f"LocalStagingArea({str(self._path)!r})"


class _Limited(io.RawIOBase):
    """Reads at most `limit` bytes of an open binary file, then EOF; closes it with itself."""

    def __init__(self, handle: BinaryIO, limit: int) -> None:
        super().__init__()
        self._handle = handle
        self._left = max(0, limit)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer).cast("B")[: self._left]
        count = self._handle.readinto(view)  # type: ignore[attr-defined]
        count = count or 0
        self._left -= count
        return int(count)

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


def _newest_mtime(path: Path) -> float:
    """The latest modification time of `path` and everything under it (no symlinks)."""
    newest = path.lstat().st_mtime
    for directory, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(directory, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A `Storage` in a local directory; see the module docstring for layout and guarantees.

    Every key is validated (`check_key`) and every path is checked, after resolving
    symbolic links, to be inside `root`: nothing is ever read or written outside it.
    """

    def __init__(self, root: Path) -> None:
        # A new archive directory is the owner's alone (recordings are personal data);
        # an existing one keeps the modes its owner gave it.
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        """The resolved root directory."""
        return self._root

    def __repr__(self) -> str:
        return f"LocalStorage({str(self._root)!r})"

    # -- paths ----------------------------------------------------------------------------

    def local_path(self, key: str) -> Path:
        """The absolute file path of `key` (validated; the file may not exist)."""
        parts = check_key(key)
        path = self._root.joinpath(*parts)
        self._check_inside(path)
        return path

    def _check_inside(self, path: Path) -> None:
        resolved = path.resolve(strict=False)
        if resolved != self._root and not resolved.is_relative_to(self._root):
            raise UnsafeNameError("storage key resolves outside the storage root")
        if resolved.is_relative_to(self._root / STAGING_NAME):
            raise UnsafeNameError("storage key resolves into the staging directory")

    def staging_dir(self) -> Path:
        """The hidden directory for files being downloaded (same filesystem as the root)."""
        staging = self._root / STAGING_NAME
        if not staging.is_dir():
            staging.mkdir(mode=0o700, exist_ok=True)
            _fsync_dir(self._root)
        return staging

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` and its missing parents, each made durable in its parent."""
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(path.parent)

    # -- writing --------------------------------------------------------------------------

    # A directory does not lock: retention and holds are callvault's to keep.
    locks = False
    # Nor does it keep hashes: a file is hashed when it is read back (`checksum`).
    keeps_sha256 = False

    def lock_state(self, key: str) -> ObjectLock | None:
        return None

    def retain(self, key: str, until: datetime) -> None:
        return None

    def legal_hold(self, key: str, on: bool) -> None:
        return None

    def put_file(
        self,
        key: str,
        src: Path,
        *,
        sha256: str | None = None,
        retain_until: datetime | None = None,
    ) -> StoredObject:
        """Move the complete file `src` into place under `key`, durably; `src` is consumed.

        `src` should be in `staging_dir()`; from another filesystem it is copied there
        first. `sha256` is trusted when given (the caller hashed while writing); without it
        the bytes are hashed only if `key` exists already, to compare them, and the result's
        `sha256` is None. If `key` exists with the same bytes this is a no-op (and `src` is
        removed); with different bytes `ConflictError` is raised and both files are left
        alone.
        """
        dest = self.local_path(key)
        with src.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            os.fsync(handle.fileno())
        os.chmod(src, _FILE_MODE)
        self._make_dirs(dest.parent)
        self._check_inside(dest)
        try:
            os.link(src, dest)
        except FileExistsError:
            existing = self._existing(key, dest)
            if sha256 is None and existing.size == size:
                with src.open("rb") as handle:
                    sha256, size = sha256_of(handle)
            if existing.size == size and existing.sha256 == sha256:
                src.unlink()
                return existing
            raise ConflictError(f"{key} already holds different bytes") from None
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return self._put_from_elsewhere(key, src, sha256)
            raise
        _fsync_dir(dest.parent)
        src.unlink()
        modified = datetime.fromtimestamp(dest.stat().st_mtime, UTC)
        return StoredObject(key=key, size=size, sha256=sha256, modified_at=modified)

    def _existing(self, key: str, dest: Path) -> StoredObject:
        with dest.open("rb") as handle:
            digest, size = sha256_of(handle)
        modified = datetime.fromtimestamp(dest.stat().st_mtime, UTC)
        return StoredObject(key=key, size=size, sha256=digest, modified_at=modified)

    def _put_from_elsewhere(self, key: str, src: Path, sha256: str | None) -> StoredObject:
        fd, temp_name = tempfile.mkstemp(dir=self.staging_dir(), prefix="copy-", suffix=".part")
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as handle:
                shutil.copyfileobj(handle, out, _CHUNK)
            stored = self.put_file(key, temp, sha256=sha256)
        finally:
            temp.unlink(missing_ok=True)
        src.unlink()
        return stored

    def put(self, key: str, stream: BinaryIO) -> StoredObject:
        """Store everything read from `stream` under `key` (same rules as `put_file`)."""
        check_key(key)
        fd, temp_name = tempfile.mkstemp(dir=self.staging_dir(), prefix="put-", suffix=".part")
        temp = Path(temp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            return self.put_file(key, temp, sha256=digest.hexdigest())
        finally:
            temp.unlink(missing_ok=True)

    def delete(self, key: str) -> bool:
        """Remove the file of `key`; False if there was none."""
        path = self.local_path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def new_process_staging_dir(self, tag: str) -> tuple[Path, int]:
        """A staging directory for this process alone, and the descriptor of its lock.

        Keep the descriptor open while the process works (closing it, or dying, lets
        `remove_abandoned_staging_dirs` and `clean_staging` delete the directory). The
        directory only ever appears under its final name with the lock already held, so no
        other process can mistake a directory being set up for an abandoned one.
        """
        staging = self.staging_dir()
        suffix = uuid4().hex[:8]
        setup = staging / f"{_SETUP_PREFIX}{suffix}"
        setup.mkdir(mode=0o700)
        fd = os.open(setup / STAGING_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            final = staging / f"{PROCESS_PREFIX}{tag}-{suffix}"
            os.rename(setup, final)
        except BaseException:
            os.close(fd)
            shutil.rmtree(setup, ignore_errors=True)
            raise
        return final, fd

    def remove_abandoned_staging_dirs(self) -> list[str]:
        """Delete every process staging directory whose lock no live process holds (its
        process is gone, with whatever partial downloads it left); their names."""
        removed: list[str] = []
        for entry in os.scandir(self.staging_dir()):
            if not entry.name.startswith(PROCESS_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = try_lock_staging_dir(Path(entry.path))
            except (FileNotFoundError, NotADirectoryError):
                continue  # no lock: an older callvault's; `clean_staging` removes it by age
            if fd is None:
                continue  # a live process's
            try:
                shutil.rmtree(entry.path, ignore_errors=True)
            finally:
                os.close(fd)
            removed.append(entry.name)
        return removed

    def clean_staging(self, older_than: timedelta, *, now: datetime | None = None) -> int:
        """Delete leftovers of crashed downloads; returns how many entries were removed.

        Files directly in the staging area go when last modified before
        `now - older_than`. A directory goes whole when no live process holds its lock; a
        directory without a lock file (an older callvault's) or abandoned while being set
        up when nothing in it was modified since the cutoff. A directory whose lock is
        held belongs to a running process and is left alone, however old.
        """
        cutoff = (now or datetime.now(UTC)).timestamp() - older_than.total_seconds()
        removed = 0
        staging = self.staging_dir()
        for entry in os.scandir(staging):
            try:
                info = entry.stat(follow_symlinks=False)
                if stat_module.S_ISDIR(info.st_mode):
                    if self._remove_stale_dir(Path(entry.path), cutoff):
                        removed += 1
                    continue
                if info.st_mtime >= cutoff:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def _remove_stale_dir(self, directory: Path, cutoff: float) -> bool:
        try:
            if directory.name.startswith(_SETUP_PREFIX):  # its lock may not be held yet
                raise FileNotFoundError
            fd = try_lock_staging_dir(directory)
        except FileNotFoundError:
            if _newest_mtime(directory) >= cutoff:
                return False
            shutil.rmtree(directory, ignore_errors=True)
            return True
        if fd is None:
            return False
        try:
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(fd)
        return True

    def open_staging(self, tag: str) -> LocalStagingArea:
        """This process's staging directory (`new_process_staging_dir`), after removing the
        directories of processes that are gone (`remove_abandoned_staging_dirs`)."""
        for name in self.remove_abandoned_staging_dirs():
            log.info("removed the partial downloads of a stopped process (%s)", name)
        safe_tag = re.sub(r"[^A-Za-z0-9-]", "", tag)[:48] or "process"
        path, fd = self.new_process_staging_dir(safe_tag)
        return LocalStagingArea(path, fd)

    # -- reading --------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        """Open the file of `key` for reading."""
        return self.local_path(key).open("rb")

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """`length` bytes of the file of `key` from `start` (fewer if the file is shorter)."""
        handle = self.local_path(key).open("rb")
        try:
            handle.seek(start)
        except BaseException:
            handle.close()
            raise
        return cast(BinaryIO, _Limited(handle, length))

    def describe(self) -> str:
        """The root directory."""
        return str(self._root)

    def locate(self, key: str) -> str:
        """The absolute path of the file of `key`."""
        return str(self.local_path(key))

    def check(self) -> str | None:
        """None when the archive directory is there and this process may write in it."""
        if not self._root.is_dir():
            return f"the archive directory {self._root} is missing"
        if not os.access(self._root, os.W_OK | os.X_OK):
            return f"the archive directory {self._root} is not writable by this process"
        usage = self.usage()
        if usage is not None and usage.free is not None and usage.free < 64 * 1024 * 1024:
            return f"the disk of {self._root} is full ({usage.free} bytes free)"
        return None

    def usage(self) -> StorageUsage | None:
        """The file system's size, used and free space (None if it cannot be read)."""
        try:
            disk = shutil.disk_usage(self._root)
        except OSError:
            return None
        return StorageUsage(total=disk.total, used=disk.used, free=disk.free)

    def stat(self, key: str) -> StoredObject | None:
        """Size and modification time of `key`, or None if there is no such file."""
        path = self.local_path(key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat_module.S_ISREG(info.st_mode):
            return None
        return StoredObject(
            key=key,
            size=info.st_size,
            sha256=None,
            modified_at=datetime.fromtimestamp(info.st_mtime, UTC),
        )

    def recorded_checksum(self, key: str) -> StoredObject | None:
        """None: a file keeps no checksum of its own (`checksum` reads it);
        FileNotFoundError if absent."""
        if self.stat(key) is None:
            raise FileNotFoundError(key)
        return None

    def checksum(self, key: str) -> StoredObject:
        """Read the whole file of `key` and return its size and SHA-256."""
        return self._existing(key, self.local_path(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every stored key starting with `prefix`, sorted; skips staging and callvault's own
        files, hidden entries and anything whose path is not a valid key."""
        for directory, dirnames, filenames in os.walk(self._root):
            relative = Path(directory).relative_to(self._root)
            at_root = relative == Path(".")
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not d.startswith(".") and not (at_root and d.startswith(RESERVED_PREFIX))
            )
            for filename in sorted(filenames):
                if filename.startswith(".") or (at_root and filename.startswith(RESERVED_PREFIX)):
                    continue
                key = filename if at_root else f"{relative.as_posix()}/{filename}"
                if not key.startswith(prefix):
                    continue
                try:
                    check_key(key)
                except UnsafeNameError:
                    continue
                yield key


if TYPE_CHECKING:  # mypy checks that LocalStorage is a Storage
    _IS_A_STORAGE: type[Storage] = LocalStorage
