"""The index's migrations build exactly the schema of schema.py, on a real SQLite file."""

from __future__ import annotations

import multiprocessing
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from callvault.index import IndexMissingError, IndexOpenError, open_index, users
from callvault.index._index import _MIGRATIONS, write_transaction
from callvault.index.schema import metadata

HEAD = "0002"


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
            assert version == HEAD
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
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(HEAD,)]
    engine.dispose()


def test_other_databases_and_missing_drivers_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(IndexOpenError, match="needs SQLite or PostgreSQL, not mysql") as info:
        open_index("mysql://user:s3cret-pw@127.0.0.1/x")
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(IndexOpenError, match=r"driver .* is not installed"):
        open_index("postgresql+pg8000://user@127.0.0.1:1/x")


def _migrate(engine: Engine, target: str, *, down: bool = False) -> None:
    """Run the index's migrations up or down to `target` on `engine`, as open_index does."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with write_transaction(engine) as conn:
        config.attributes["connection"] = conn
        if down:
            command.downgrade(config, target)
        else:
            command.upgrade(config, target)


def _users_sql(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'users'")).scalar_one()
        )


_V1_USERS = [
    (1, "alice", "hash-a", "admin", "", "2024-05-01 09:00:00.000000", None),
    (2, "bob", "hash-b", "listener", "2000-2099", "2024-05-01 09:01:00.000000", None),
    (3, "carol", "hash-c", "admin", "", "2024-05-01 09:02:00.000000", "2024-05-02 09:00:00"),
]
_V1_TOKENS = [
    (7, 2, "report", "a" * 64, "2024-05-01 10:00:00.000000", "alice", None, None),
    (8, 3, "backup", "b" * 64, "2024-05-01 10:01:00.000000", "alice", None, None),
]


def _version_1_index(url: str) -> None:
    """A database of schema 0001 with three users and two API tokens, as an older callvault
    left it (a plain engine: the rows go in exactly as written)."""
    engine = create_engine(url)
    try:
        _migrate(engine, "0001")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO users (id, name, password_hash, role, scope, created_at, "
                    "disabled_at) VALUES (:i, :n, :h, :r, :s, :c, :d)"
                ),
                [dict(zip("inhrscd", row, strict=True)) for row in _V1_USERS],
            )
            conn.execute(
                text(
                    "INSERT INTO api_tokens (id, user_id, label, token_sha256, created_at, "
                    "created_by, revoked_at, last_used_at) "
                    "VALUES (:i, :u, :l, :t, :c, :b, :r, :w)"
                ),
                [dict(zip("iultcbrw", row, strict=True)) for row in _V1_TOKENS],
            )
    finally:
        engine.dispose()


def test_upgrade_to_0002_keeps_users_and_tokens_and_ends_id_reuse(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'callvault.db'}"
    _version_1_index(url)
    index = open_index(url)  # upgrades with foreign keys on, as in production
    try:
        engine = index.engine
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, name, password_hash, role, scope, created_at, disabled_at, "
                    "session_epoch FROM users ORDER BY id"
                )
            ).all()
            tokens = conn.execute(text("SELECT * FROM api_tokens ORDER BY id")).all()
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), metadata
            )
        # Every user and every API token survived the rebuild of `users`, unchanged.
        assert [tuple(row[:7]) for row in rows] == _V1_USERS
        assert [tuple(row) for row in tokens] == _V1_TOKENS
        epochs = [row.session_epoch for row in rows]
        assert all(len(epoch) >= 16 for epoch in epochs) and len(set(epochs)) == len(epochs)
        assert diff == []
        assert "AUTOINCREMENT" in _users_sql(engine)
        # The highest id, once removed, is never handed out again.
        assert users.remove_user(engine, "carol")
        newcomer = users.add_user(engine, "dave", "admin", "dave-password-1")
        assert newcomer.id > 3
        assert users.session_epoch(engine, newcomer.id) not in epochs
    finally:
        index.close()


def test_a_new_index_never_reuses_a_removed_users_id(tmp_path: Path) -> None:
    index = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    try:
        engine = index.engine
        users.add_user(engine, "alice", "admin", "alice-password-1")
        bob = users.add_user(engine, "bob", "listener", "bob-password-1", "2000-2099")
        assert users.remove_user(engine, "bob")
        erin = users.add_user(engine, "erin", "admin", "erin-password-1")
        assert erin.id > bob.id
    finally:
        index.close()


def test_downgrade_from_0002_keeps_users_and_tokens(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'callvault.db'}"
    _version_1_index(url)
    index = open_index(url)
    try:
        _migrate(index.engine, "0001", down=True)  # foreign keys on here too
        with index.engine.connect() as conn:
            inspector = inspect(conn)
            assert "revoked_sessions" not in inspector.get_table_names()
            assert "session_epoch" not in {c["name"] for c in inspector.get_columns("users")}
            rows = conn.execute(text("SELECT * FROM users ORDER BY id")).all()
            tokens = conn.execute(text("SELECT * FROM api_tokens ORDER BY id")).all()
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert [tuple(row) for row in rows] == _V1_USERS
        assert [tuple(row) for row in tokens] == _V1_TOKENS
        assert version == "0001"
        assert "AUTOINCREMENT" not in _users_sql(index.engine)
    finally:
        index.close()
