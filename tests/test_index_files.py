"""The index's database as files and as a whole: private modes, a race-safe first open,
damage reported in one line, URLs and drivers refused clearly."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from multiprocessing.queues import Queue
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, text

from callvault.index import (
    Index,
    IndexCorruptError,
    IndexFailure,
    IndexMissingError,
    IndexOpenError,
    SearchFilters,
    open_index,
)
from callvault.index._index import SCHEMA_REVISION
from callvault.pbx._types import CallDetail
from support import first_open
from support.index_data import NOW


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- modes -------------------------------------------------------------------------------


def test_a_new_index_and_its_side_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # a usual umask: files 0644 unless made otherwise
    try:
        directory = tmp_path / "new-archive"
        path = directory / "callvault.db"
        with open_index(f"sqlite:///{path}") as index:
            index.users.add("alice", "admin", "alice-password")  # the WAL file is in use
            wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
            assert wal.exists() and shm.exists()
            assert {_mode(p) for p in (path, wal, shm)} == {0o600}
            assert _mode(directory) == 0o700
    finally:
        os.umask(old_umask)


def test_an_existing_index_readable_by_others_is_tightened_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "callvault.db"
    url = f"sqlite:///{path}"
    open_index(url).close()
    path.chmod(0o644)
    wal = Path(f"{path}-wal")
    wal.write_bytes(b"")  # as a crash leaves it
    wal.chmod(0o664)
    with caplog.at_level(logging.INFO, logger="callvault.index"), open_index(url):
        assert _mode(path) == 0o600 and _mode(wal) == 0o600  # (the last close removes -wal)
    lines = [r.getMessage() for r in caplog.records if r.name == "callvault.index"]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and str(wal) in lines[0] and "0600" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="callvault.index"):
        open_index(url, create=False).close()
    assert [r for r in caplog.records if r.name == "callvault.index"] == []


# -- a race-safe first open ------------------------------------------------------------------


def test_eight_processes_opening_one_new_archive_at_once_all_succeed(tmp_path: Path) -> None:
    # Real processes (forked from a fork server: no state shared with pytest's), started
    # together by a barrier, all creating and migrating the same new file, round after round.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(first_open.PRELOAD)
    count, rounds = 8, 20
    start = context.Barrier(count)
    results: Queue[str] = context.Queue()
    processes = [
        context.Process(
            target=first_open.open_every_round, args=(str(tmp_path), rounds, start, results)
        )
        for _ in range(count)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=300) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
    failures = [o for o in outcomes if o != "ok"]
    assert failures == [], failures[0]
    assert [process.exitcode for process in processes] == [0] * count
    for number in range(rounds):
        engine = create_engine(f"sqlite:///{tmp_path / f'round-{number}' / 'callvault.db'}")
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            assert [tuple(v) for v in versions] == [(SCHEMA_REVISION,)]
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        engine.dispose()


def test_first_open_waits_while_another_process_holds_the_new_file(tmp_path: Path) -> None:
    # Another process is writing to the new file (a rollback-journal write lock, as while
    # it creates the database) when this one switches it to WAL: SQLite answers "database is
    # locked" at once, without waiting on the busy timeout. The open must wait its turn.
    path = tmp_path / "callvault.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    outcome: list[BaseException | str] = []

    def open_it() -> None:
        try:
            open_index(f"sqlite:///{path}").close()
            outcome.append("opened")
        except BaseException as exc:
            outcome.append(exc)

    opener = threading.Thread(target=open_it)
    opener.start()
    # Held for a while (not a synchronisation: an open that waits succeeds whenever the
    # lock goes within the busy timeout; one that does not wait has failed by then).
    released = threading.Timer(0.5, holder.rollback)
    released.start()
    opener.join(timeout=60)
    released.join()
    holder.close()
    assert outcome == ["opened"]


# -- damage ------------------------------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_damaged_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "callvault.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IndexCorruptError) as info:
        open_index(f"sqlite:///{path}")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the index at {path} is damaged (file is not a database)")
    assert f"sqlite3 {path} 'PRAGMA integrity_check'" in message and "backup" in message
    assert isinstance(info.value, IndexFailure) and not isinstance(info.value, IndexOpenError)


def _damaged_index(tmp_path: Path) -> Path:
    """An index whose `calls` table spans many pages, some overwritten with garbage after
    it was written; the schema and the first pages are intact, so it opens."""
    path = tmp_path / "callvault.db"
    with open_index(f"sqlite:///{path}") as index:
        for batch in range(10):
            index.calls.record(
                [
                    CallDetail(
                        callid=f"{batch}.{n}", callfrom="1" * 100, recording=f"{batch}-{n}.wav"
                    )
                    for n in range(200)
                ],
                source="cdr",
                tz=ZoneInfo("UTC"),
                now=NOW,
            )
        with index.engine.begin() as conn:  # archived, so that `verify` reads them too
            conn.execute(
                text(
                    "UPDATE recordings SET state = 'archived', size = 1, sha256 = :sha, "
                    "storage_key = name"
                ),
                {"sha": "a" * 64},
            )
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(size - 40 * 4096)
        handle.write(b"\xa5" * 20 * 4096)
    return path


def test_damage_found_by_a_later_query_is_one_line_and_check_finds_it(tmp_path: Path) -> None:
    path = _damaged_index(tmp_path)
    with open_index(f"sqlite:///{path}") as index:
        problems = index.check()
        assert problems != [] and all("\n" not in p for p in problems)
        assert index.check(quick=False) != []
        with pytest.raises(IndexCorruptError) as info:
            index.recordings.search(SearchFilters(), limit=100_000)
        assert str(info.value).startswith(f"the index at {path} is damaged (")
        assert "\n" not in str(info.value)
        with pytest.raises(IndexCorruptError):
            list(index.recordings.archived())
            index.recordings.total(SearchFilters(number="1"))


def test_a_sound_index_checks_clean(index: Index) -> None:
    assert index.check() == []
    assert index.check(quick=False) == []


def test_every_command_says_the_index_is_damaged_in_one_line(tmp_path: Path) -> None:
    path = _damaged_index(tmp_path)
    for command in (["list", "--limit", "0"], ["verify"]):
        done = subprocess.run(
            [sys.executable, "-m", "callvault", *command, "--archive", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 1, (command, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"callvault: error: the index at {path} is damaged (")


# -- what cannot be opened -----------------------------------------------------------------


def test_missing_file_without_create_is_refused_and_not_made(tmp_path: Path) -> None:
    path = tmp_path / "nothing" / "callvault.db"
    with pytest.raises(IndexMissingError):
        open_index(f"sqlite:///{path}", create=False)
    assert not path.exists()
    assert not path.parent.exists()


def test_bad_urls_give_one_clear_error_without_password() -> None:
    with pytest.raises(IndexOpenError):
        open_index("not a url at all")
    with pytest.raises(IndexOpenError) as info:
        open_index("nosuchdb://user:s3cret-pw@127.0.0.1/x")
    assert "s3cret-pw" not in str(info.value)


def test_other_databases_and_missing_drivers_are_one_line() -> None:
    with pytest.raises(IndexOpenError, match="needs SQLite or PostgreSQL, not mysql") as info:
        open_index("mysql://user:s3cret-pw@127.0.0.1/x")
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(IndexOpenError, match=r"driver .* is not installed"):
        open_index("postgresql+pg8000://user@127.0.0.1:1/x")


def test_an_unreachable_server_is_one_line_without_password() -> None:
    with pytest.raises(IndexOpenError) as info:
        open_index("postgresql+psycopg://user:s3cret-pw@127.0.0.1:1/x?connect_timeout=5")
    assert "s3cret-pw" not in str(info.value) and "\n" not in str(info.value)
