"""The database under the index: the engine, its set-up, and the one way stores use it.

Every store method runs one short transaction: reads in `Database.read()`, writes in
`Database.write()`. On SQLite a write transaction starts with ``BEGIN IMMEDIATE``, so
writers queue on the database lock (``busy_timeout``) instead of failing half-way; on
PostgreSQL workers claim jobs with ``SELECT ... FOR UPDATE SKIP LOCKED``.

Set-up of a SQLite file: created 0600 (its -wal and -shm inherit that from it), its
directory 0700 when the index makes it; an existing file readable by others is tightened on
open. The busy timeout is set before any other pragma and WAL is switched on only if it is
not on yet, retried while another process holds the lock, so several processes may open
one new archive at once. A damaged database raises `IndexCorruptError`, from the first
connection and from any later statement (translated in `_translate_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import ConnectionPoolEntry

from callvault.index._errors import IndexCorruptError, IndexOpenError

log = logging.getLogger("callvault.index")

_BUSY_TIMEOUT_MS = 30_000
SUPPORTED_DIALECTS = ("sqlite", "postgresql")
# SQLite's primary result codes for a damaged file (extended codes keep them in the low byte).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_SQLITE_DAMAGE_WORDS = ("file is not a database", "database disk image is malformed")
# PostgreSQL's SQLSTATEs data_corrupted and index_corrupted.
_PG_DAMAGE_STATES = ("XX001", "XX002")
_SIDE_FILES = ("-wal", "-shm", "-journal")


_LIKE_SPECIALS = str.maketrans({"\\": "\\\\", "%": "\\%", "_": "\\_"})


def like_pattern(text: str) -> str:
    """A LIKE pattern (escape character backslash) matching `text` anywhere."""
    return "%" + text.translate(_LIKE_SPECIALS) + "%"


def redact(url: str) -> str:
    """The URL as it may be shown: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for other engines and in-memory databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def prepare_sqlite_file(path: Path) -> None:
    """Make the index file (and its directory) if missing, with private modes, and tighten
    the modes of an existing one (see the module docstring).

    Raises `IndexOpenError` when the directory or the file cannot be made.
    """
    if not path.exists():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexOpenError(f"cannot create {path.parent}: {exc.strerror}") from exc
        try:
            # An empty file is an empty SQLite database; made here so that it is private
            # from its first byte (SQLite gives its -wal and -shm the same mode).
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it a moment ago
        except OSError as exc:
            raise IndexOpenError(f"cannot create {path}: {exc.strerror}") from exc
        else:
            os.close(fd)
    _tighten(path)


def _tighten(path: Path) -> None:
    """Take every permission of group and others off the index file and its side files."""
    tightened: list[str] = []
    refused: list[str] = []
    for candidate in [path, *(path.with_name(path.name + s) for s in _SIDE_FILES)]:
        try:
            mode = stat.S_IMODE(candidate.stat().st_mode)
        except OSError:
            continue  # not there (side files come and go)
        if not mode & 0o077:
            continue
        try:
            candidate.chmod(mode & 0o700)
        except OSError:
            refused.append(str(candidate))
        else:
            tightened.append(f"{candidate} ({mode:04o})")
    if tightened:
        log.info("the index files were readable by other users; now 0600: %s", ", ".join(tightened))
    if refused:
        log.warning(
            "the index files %s are readable by other users and their modes cannot be "
            "changed by this user: chmod 600 them",
            ", ".join(refused),
        )


def make_engine(url: str) -> Engine:
    """The engine of `url` (SQLite or PostgreSQL), with damage translated to
    `IndexCorruptError`. May raise ArgumentError, NoSuchModuleError or ImportError."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True)
    else:
        engine = create_engine(
            url,
            connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
    _translate_errors(engine, url)
    return engine


def _on_sqlite_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
    # We issue BEGIN ourselves (see _on_sqlite_begin), so pysqlite must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # First of all: every later statement, pragmas included, waits for a lock.
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        _use_wal(cursor)
        # FULL: a committed event survives a power cut, which is what the 200 promises.
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _use_wal(cursor: sqlite3.Cursor) -> None:
    """Switch the database to WAL unless it is already (a persistent setting of the file).

    Switching needs the database to itself for a moment, and SQLite may answer "database is
    locked" at once, without waiting on the busy timeout, while another process opens or
    migrates the same new file: then it is retried until the busy timeout has passed.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    pause = 0.005
    while True:
        try:
            mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode == "wal":
                return
            mode = str(cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode == "wal":
                return
            problem: Exception = sqlite3.OperationalError(f"journal mode stays {mode}")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            problem = exc
        if time.monotonic() >= deadline:
            raise problem
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _on_sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("callvault_begin", "")
    conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "immediate" else "BEGIN")


def _damage(error: BaseException | None) -> str | None:
    """The driver's words if `error` says the database is damaged, else None."""
    if error is None:
        return None
    code = getattr(error, "sqlite_errorcode", None)
    words = " ".join(str(error).split())
    if isinstance(code, int) and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return words
    if isinstance(error, sqlite3.DatabaseError) and any(w in words for w in _SQLITE_DAMAGE_WORDS):
        return words
    if getattr(error, "sqlstate", None) in _PG_DAMAGE_STATES:
        return words
    return None


def corrupt_error(url: str, reason: str) -> IndexCorruptError:
    """The one-line `IndexCorruptError` for the database at `url`."""
    path = sqlite_path(url)
    if path is not None:
        message = (
            f"the index at {path} is damaged ({reason}): check it with "
            f"`sqlite3 {path} 'PRAGMA integrity_check'` and restore it from a backup"
        )
    else:
        message = (
            f"the index at {redact(url)} is damaged ({reason}): check the database "
            "server's log and restore the database from a backup"
        )
    return IndexCorruptError(message, reason=reason)


def _translate_errors(engine: Engine, url: str) -> None:
    """Every error of `engine` that says the database is damaged becomes IndexCorruptError."""

    def handle_error(context: ExceptionContext) -> BaseException | None:
        reason = _damage(context.original_exception)
        if reason is None:
            return None
        error = corrupt_error(url, reason)
        error.__cause__ = context.sqlalchemy_exception
        return error

    event.listen(engine, "handle_error", handle_error, retval=True)


class Database:
    """The engine as the stores use it: `read()`, `write()` and the dialect's `insert`."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.dialect = engine.dialect.name

    def read(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection for reading (no transaction is held beyond the statements)."""
        return self.engine.connect()

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection inside a write transaction, committed when the block ends normally.

        Use it for every write: on SQLite a plain (deferred) BEGIN that reads first cannot
        upgrade to a writer while another connection writes and fails at once with
        "database is locked"; BEGIN IMMEDIATE queues on `busy_timeout` instead.
        """
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.execution_options(callvault_begin="immediate")
            with conn.begin():
                yield conn

    def insert(self, table: Table) -> Any:
        """The dialect's INSERT that supports ON CONFLICT (SQLite and PostgreSQL); only the
        index's own dialect is imported (PostgreSQL's costs a SQLite user 25 ms of start-up)."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects import sqlite

            return sqlite.insert(table)
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)

    def check(self, *, quick: bool = True) -> list[str]:
        """Problems the database finds in itself ([] = none): on SQLite ``PRAGMA
        quick_check`` (or the slower, thorough ``integrity_check``); on PostgreSQL, whose
        server guards its own pages, a trivial query."""
        try:
            with self.read() as conn:
                if self.dialect != "sqlite":
                    conn.execute(text("SELECT 1"))
                    return []
                pragma = "quick_check" if quick else "integrity_check"
                rows = [str(row[0]) for row in conn.exec_driver_sql(f"PRAGMA {pragma}")]
        except IndexCorruptError as exc:
            return [exc.reason]
        return [] if rows == ["ok"] else rows
