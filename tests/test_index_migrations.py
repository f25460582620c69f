"""The index's migrations build exactly the schema of schema.py, on a real SQLite file."""

from __future__ import annotations

import multiprocessing
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from callvault.index import IndexMissingError, IndexOpenError, open_index
from callvault.index.schema import metadata


def test_upgrade_head_yields_exactly_the_metadata(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'archive' / 'callvault.db'}"
    open_index(url).close()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), metadata
            )
            assert diff == []
            inspector = inspect(conn)
            tables = set(inspector.get_table_names()) - {"alembic_version"}
            assert tables == set(metadata.tables)
            for name, table in metadata.tables.items():
                columns = {c["name"]: c for c in inspector.get_columns(name)}
                assert set(columns) == {c.name for c in table.columns}
                for column in table.columns:
                    assert columns[column.name]["nullable"] == column.nullable, (name, column.name)
                indexes = {i["name"] for i in inspector.get_indexes(name)}
                assert indexes == {i.name for i in table.indexes}
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
            assert version == "0001"
    finally:
        engine.dispose()


def test_reopen_is_idempotent_and_pragmas_are_set(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'callvault.db'}"
    open_index(url).close()
    index = open_index(url)
    try:
        with index.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 1000
            count = conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one()
            assert count == 1
    finally:
        index.close()


def test_missing_file_without_create_is_refused_and_not_made(tmp_path: Path) -> None:
    path = tmp_path / "nothing" / "callvault.db"
    with pytest.raises(IndexMissingError):
        open_index(f"sqlite:///{path}", create=False)
    assert not path.exists()
    assert not path.parent.exists()


def test_bad_urls_give_one_clear_error_without_password(tmp_path: Path) -> None:
    with pytest.raises(IndexOpenError):
        open_index("not a url at all")
    with pytest.raises(IndexOpenError) as info:
        open_index("nosuchdb://user:s3cret-pw@127.0.0.1/x")
    assert "s3cret-pw" not in str(info.value)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "callvault.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IndexOpenError) as info:
        open_index(f"sqlite:///{path}")
    assert str(path) in str(info.value)


def test_unknown_newer_revision_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'callvault.db'}"
    open_index(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(IndexOpenError, match="newer version"):
        open_index(url)


def _open_in_child(url: str, start: Barrier, results: Queue[str]) -> None:
    """In a spawned process: wait for the others, then open (and so create) the index."""
    try:
        start.wait(timeout=60)
        open_index(url).close()
    except BaseException:
        results.put(traceback.format_exc())
        raise
    results.put("ok")


def test_two_processes_worth_of_first_opens_race_safely(tmp_path: Path) -> None:
    # Real processes (spawned: no state shared with pytest's), started together by a
    # barrier, all creating and migrating the same new file.
    url = f"sqlite:///{tmp_path / 'new' / 'callvault.db'}"
    context = multiprocessing.get_context("spawn")
    count = 4
    start = context.Barrier(count)
    results: Queue[str] = context.Queue()
    processes = [
        context.Process(target=_open_in_child, args=(url, start, results)) for _ in range(count)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=120) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
    assert outcomes == ["ok"] * count, "\n".join(o for o in outcomes if o != "ok")
    assert [process.exitcode for process in processes] == [0] * count
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [("0001",)]
    engine.dispose()


def test_other_databases_and_missing_drivers_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(IndexOpenError, match="needs SQLite or PostgreSQL, not mysql") as info:
        open_index("mysql://user:s3cret-pw@127.0.0.1/x")
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(IndexOpenError, match=r"driver .* is not installed"):
        open_index("postgresql+pg8000://user@127.0.0.1:1/x")
