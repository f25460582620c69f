"""The index's migrations: they build exactly the schema of schema.py, upgrade archives of
every earlier version with their data, and refuse a newer one; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from argon2 import PasswordHasher
from sqlalchemy import Engine, column, create_engine, inspect, select, table, text

from callvault.index import (
    Index,
    IndexOpenError,
    SearchFilters,
    SettingKey,
    Worker,
    open_index,
    schema,
)
from callvault.index.schema import metadata
from callvault.pbx import CallDetail
from support.databases import migrate

HEAD = "0017"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _search_structure(name: str | None) -> bool:
    """The number search's FTS5 table (and its shadow tables) or trigram indexes: made by
    migration 0004 beside the metadata (see schema.py)."""
    return bool(name) and (
        str(name).startswith(schema.NUMBER_SEARCH_TABLE) or name in schema.TRIGRAM_INDEXES
    )


def _schema_problems(engine: Engine) -> list[Any]:
    def include(_object: Any, name: str | None, *_: Any) -> bool:
        return not _search_structure(name)

    opts = {"compare_type": True, "include_object": include}
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn, opts=opts), metadata))


def test_upgrade_head_yields_exactly_the_metadata(empty_db_url: str) -> None:
    with open_index(empty_db_url) as index:
        engine = index.engine
        assert _schema_problems(engine) == []
        with engine.connect() as conn:
            inspector = inspect(conn)
            names = set(inspector.get_table_names()) - {"alembic_version"}
            tables = {name for name in names if not _search_structure(name)}
            assert tables == set(metadata.tables)
            if engine.dialect.name == "sqlite":
                assert schema.NUMBER_SEARCH_TABLE in names
            else:
                trigram = {i["name"] for i in inspector.get_indexes("calls")}
                assert trigram >= set(schema.TRIGRAM_INDEXES)
            for name, table_ in metadata.tables.items():
                columns = {c["name"]: c for c in inspector.get_columns(name)}
                assert set(columns) == {c.name for c in table_.columns}
                for column in table_.columns:
                    assert columns[column.name]["nullable"] == column.nullable, (name, column.name)
                indexes = {
                    i["name"]
                    for i in inspector.get_indexes(name)
                    if not i.get("duplicates_constraint")  # PostgreSQL's of a UNIQUE
                    and not _search_structure(i["name"])
                }
                assert indexes == {i.name for i in table_.indexes}, name
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
            assert version == HEAD


def test_the_revision_that_skips_alembic_is_the_newest_migration(tmp_path: Path) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from callvault.index._index import MIGRATIONS, SCHEMA_REVISION

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_REVISION
    with open_index(f"sqlite:///{tmp_path / 'x.db'}") as index:
        assert index.schema_revision() == SCHEMA_REVISION


def test_opening_an_index_at_the_newest_schema_does_not_load_alembic(tmp_path: Path) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'x.db'}"
    open_index(url).close()
    probe = (
        "import sys\n"
        "from callvault.index import open_index\n"
        f"open_index({url!r}).close()\n"
        "print('alembic' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_reopen_is_idempotent_and_pragmas_are_set(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'callvault.db'}"
    open_index(url).close()
    with open_index(url) as index, index.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 1000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL
        count = conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one()
        assert count == 1


def test_unknown_newer_revision_is_a_clear_error(empty_db_url: str) -> None:
    open_index(empty_db_url).close()
    engine = create_engine(empty_db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(IndexOpenError, match="newer version"):
        open_index(empty_db_url)


def test_ids_of_removed_users_and_processes_are_never_reused(index: Index) -> None:
    index.users.add("alice", "admin", "alice-password-1")
    bob = index.users.add("bob", "listener", "bob-password-1", "2000-2099")
    index.users.remove("bob")
    assert index.users.add("erin", "admin", "erin-password-1").id > bob.id
    first = index.processes.register(
        node="n", kind="serve", hostname="h", pid=1, workers=1, now=NOW
    )
    index.processes.stop(first.id, now=NOW)
    assert index.processes.prune(before=NOW + timedelta(seconds=1)) == 1
    second = index.processes.register(
        node="n", kind="serve", hostname="h", pid=1, workers=1, now=NOW
    )
    assert second.id > first.id


# -- from 0002, the schema of every archive made before processes and session rows ----------

_HASHER = PasswordHasher()
_T = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def _rows(engine: Engine, name: str, columns: list[str]) -> list[tuple[Any, ...]]:
    t = table(name, *(column(c) for c in columns))
    with engine.connect() as conn:
        rows = conn.execute(select(*t.c).order_by(t.c[columns[0]])).all()
    return [tuple(_utc(v) for v in row) for row in rows]


def _utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == " ":
        return datetime.fromisoformat(value).replace(tzinfo=UTC)  # SQLite's text datetimes
    return value


_V2_DATA: dict[str, list[dict[str, Any]]] = {
    "calls": [
        {"id": 1, "callid": "1714550400.1", "pbx_serial": "SN1", "start_at": _T,
         "timestart_local": "2024-05-01 11:00:00", "call_from": "1001", "call_to": "2001",
         "duration_s": 20, "talk_s": 15, "direction": "Internal", "status": "ANSWERED",
         "src_trunk": "", "dst_trunk": "", "did": "", "pincode": "", "agent_ring_s": None,
         "source": "event", "first_seen_at": _T, "raw": "{}"},
        {"id": 2, "callid": "1714550400.2", "pbx_serial": "SN1", "start_at": _T,
         "timestart_local": "2024-05-01 11:00:00", "call_from": "1002", "call_to": "2002",
         "duration_s": 30, "talk_s": 25, "direction": "Internal", "status": "ANSWERED",
         "src_trunk": "", "dst_trunk": "", "did": "", "pincode": "", "agent_ring_s": 3,
         "source": "cdr", "first_seen_at": _T, "raw": "{}"},
    ],
    "recordings": [
        {"id": 1, "name": "a.wav", "call_id": 1, "state": "archived", "attempts": 1,
         "last_error": None, "next_attempt_at": None, "claimed_by": None,
         "claimed_until": None, "missing_since": None, "size": 1234, "sha256": "a" * 64,
         "storage_key": "SN1/2024/05/01/a.wav", "content_type": "audio/x-wav",
         "archived_at": _T, "verified_at": None, "created_at": _T, "updated_at": _T},
        # In flight when the old version stopped: claimed under a lease only.
        {"id": 2, "name": "b.wav", "call_id": 2, "state": "downloading", "attempts": 2,
         "last_error": "timeout", "next_attempt_at": _T, "claimed_by": "host:41:abcdef:0",
         "claimed_until": _T + timedelta(minutes=5), "missing_since": None, "size": None,
         "sha256": None, "storage_key": "SN1/2024/05/01/b.wav", "content_type": None,
         "archived_at": None, "verified_at": None, "created_at": _T, "updated_at": _T},
    ],
    "users": [
        {"id": 1, "name": "alice", "password_hash": _HASHER.hash("alice-password"),
         "role": "admin", "scope": "", "created_at": _T, "disabled_at": None,
         "session_epoch": "epoch-alice-0001"},
        {"id": 2, "name": "bob", "password_hash": _HASHER.hash("bob-password"),
         "role": "listener", "scope": "2000-2099", "created_at": _T, "disabled_at": None,
         "session_epoch": "epoch-bob-00001"},
    ],
    "api_tokens": [
        {"id": 7, "user_id": 2, "label": "report", "token_sha256": "c" * 64, "created_at": _T,
         "created_by": "alice", "revoked_at": None, "last_used_at": None},
    ],
    "audit_log": [
        {"id": 1, "at": _T, "actor": "alice", "action": "login", "target": "alice",
         "detail": "session", "remote_addr": "127.0.0.1"},
    ],
    "settings": [
        {"key": "events_secret_path", "value": "s3cret-path", "updated_at": _T},
        {"key": "pbx_timezone", "value": "Europe/Berlin", "updated_at": _T},
    ],
    "revoked_sessions": [{"nonce": "logged-out-nonce", "expires_at": _T + timedelta(hours=12)}],
}  # fmt: skip


def _version_2_index(url: str) -> None:
    """A database of schema 0002 holding what a callvault of that version wrote."""
    migrate(url, "0002")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for name, rows in _V2_DATA.items():
                columns = list(rows[0])
                conn.execute(table(name, *(column(c) for c in columns)).insert(), rows)
                if "id" in columns and engine.dialect.name == "postgresql":
                    # As if the rows had been inserted without ids, as callvault does.
                    conn.execute(
                        text(
                            f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                            f"(SELECT max(id) FROM {name}))"
                        )
                    )
    finally:
        engine.dispose()


def test_upgrade_from_0002_keeps_every_row_and_ends_lease_only_claims_by_the_lease(
    empty_db_url: str,
) -> None:
    _version_2_index(empty_db_url)
    with open_index(empty_db_url) as index:
        engine = index.engine
        assert _schema_problems(engine) == []
        for name, rows in _V2_DATA.items():
            if name == "revoked_sessions":
                continue
            columns = list(rows[0])
            expected = [tuple(_utc(row[c]) for c in columns) for row in rows]
            found = _rows(engine, name, columns)
            if name == "settings":  # the first open also gathered the planner's statistics
                found = [row for row in found if row[0] != "statistics_calls"]
            assert found == expected, name
        assert index.settings.get(SettingKey.STATISTICS_CALLS) == "2"
        with engine.connect() as conn:
            assert "revoked_sessions" not in inspect(conn).get_table_names()
            assert conn.execute(text("SELECT count(*) FROM web_sessions")).scalar_one() == 0
            assert conn.execute(text("SELECT count(*) FROM processes")).scalar_one() == 0
        # The claim in flight has no process: its lease still protects it, then it goes on.
        row = index.recordings.by_name("b.wav")
        assert row is not None and row.claim_process_id is None
        worker = Worker(process_id=None, name="new")
        lease = timedelta(minutes=5)
        assert index.jobs.claim(worker, 5, now=_T + timedelta(minutes=4), lease=lease) == []
        [job] = index.jobs.claim(worker, 5, now=_T + timedelta(minutes=5), lease=lease)
        assert (job.name, job.attempts) == ("b.wav", 3)
        assert index.jobs.reserve_storage_key(job.recording_id, "x") == "SN1/2024/05/01/b.wav"
        # Users and tokens work as before; sessions from before have no row: log in again.
        alice = index.users.verify_password("alice", "alice-password")
        assert alice is not None and alice.is_admin
        bob = index.users.get("bob")
        assert bob is not None and bob.scope_ranges == [(2000, 2099)]
        assert index.sessions.user_of(1, "epoch-alice-0001", "any", now=_T) is None
        assert [t.label for t in index.tokens.list()] == ["report"]
        assert index.users.add("carol", "admin", "carol-password").id == 3
        assert [e.action for e in index.audit.query()] == ["login"]


def test_downgrade_from_head_to_0002_keeps_the_data(empty_db_url: str) -> None:
    _version_2_index(empty_db_url)
    open_index(empty_db_url).close()
    migrate(empty_db_url, "0002", down=True)
    engine = create_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            assert "revoked_sessions" in inspector.get_table_names()
            assert not {"processes", "web_sessions"} & set(inspector.get_table_names())
            columns = {c["name"] for c in inspector.get_columns("recordings")}
            assert "claim_process_id" not in columns
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert version == "0002"
        for name in ("calls", "recordings", "users", "api_tokens"):
            rows = _V2_DATA[name]
            columns = list(rows[0])
            expected = [tuple(_utc(row[c]) for c in columns) for row in rows]
            assert _rows(engine, name, columns) == expected, name
    finally:
        engine.dispose()
    # And up again.
    with open_index(empty_db_url) as index:
        assert _schema_problems(index.engine) == []


# -- from 0001 (SQLite: 0002 rebuilt `users` there) -------------------------------------------


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
    """A SQLite database of schema 0001 with three users and two API tokens, as an older
    callvault left it (a plain engine: the rows go in exactly as written)."""
    migrate(url, "0001")
    engine = create_engine(url)
    try:
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


def test_upgrade_from_0001_keeps_users_and_tokens_and_ends_id_reuse(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'callvault.db'}"
    _version_1_index(url)
    with open_index(url) as index:  # upgrades with foreign keys on, as in production
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
        # Every user and every API token survived the rebuild of `users`, unchanged.
        assert [tuple(row[:7]) for row in rows] == _V1_USERS
        assert [tuple(row) for row in tokens] == _V1_TOKENS
        epochs = [row.session_epoch for row in rows]
        assert all(len(epoch) >= 16 for epoch in epochs) and len(set(epochs)) == len(epochs)
        assert _schema_problems(engine) == []
        assert "AUTOINCREMENT" in _users_sql(engine)
        # The highest id, once removed, is never handed out again.
        index.users.remove("carol")
        newcomer = index.users.add("dave", "admin", "dave-password-1")
        assert newcomer.id > 3
        assert index.users.session_epoch(newcomer.id) not in epochs


def test_downgrade_to_0001_keeps_users_and_tokens(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'callvault.db'}"
    _version_1_index(url)
    open_index(url).close()
    migrate(url, "0001", down=True)  # foreign keys on here too
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            assert "revoked_sessions" not in inspector.get_table_names()
            assert "session_epoch" not in {c["name"] for c in inspector.get_columns("users")}
            rows = conn.execute(text("SELECT * FROM users ORDER BY id")).all()
            tokens = conn.execute(text("SELECT * FROM api_tokens ORDER BY id")).all()
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert [tuple(row) for row in rows] == _V1_USERS
        assert [tuple(row) for row in tokens] == _V1_TOKENS
        assert version == "0001"
        assert "AUTOINCREMENT" not in _users_sql(engine)
    finally:
        engine.dispose()


def test_upgrade_to_0004_indexes_the_numbers_of_the_calls_already_there(
    empty_db_url: str,
) -> None:
    detail = CallDetail(callid="1.1", callfrom="01637052211", callto="200", recording="a.wav")
    with open_index(empty_db_url) as index:
        index.calls.record([detail], source="cdr", tz=ZoneInfo("UTC"), now=NOW)
    migrate(empty_db_url, "0003", down=True)
    with open_index(empty_db_url) as index:
        assert index.schema_revision() == HEAD
        found = index.recordings.search(SearchFilters(number="37052"))
        assert [row.name for row in found] == ["a.wav"]
        with index.engine.connect() as conn:
            if index.dialect == "sqlite":
                match = text(
                    f"SELECT rowid FROM {schema.NUMBER_SEARCH_TABLE} WHERE "
                    f"{schema.NUMBER_SEARCH_TABLE} MATCH '\"37052\"'"
                )
                assert conn.execute(match).scalars().all() == [found[0].call_id]
            else:
                names = {i["name"] for i in inspect(conn).get_indexes("calls")}
                assert names >= set(schema.TRIGRAM_INDEXES)
                # 0005: each keeps its list of pending entries short.
                options = text("SELECT reloptions FROM pg_class WHERE relname = :name")
                for name in schema.TRIGRAM_INDEXES:
                    found_options = conn.execute(options, {"name": name}).scalar_one()
                    assert found_options == ["gin_pending_list_limit=256"], name


def test_upgrade_to_0007_makes_the_pbx_of_before_the_first_of_the_registry(
    empty_db_url: str,
) -> None:
    utc = ZoneInfo("UTC")
    before = [
        CallDetail(callid="1.1", callfrom="01637052211", callto="200", recording="a.wav", sn="S1"),
        CallDetail(callid="1.2", callfrom="300", callto="301", recording="b.wav", sn="S1"),
    ]
    with open_index(empty_db_url) as index:
        index.calls.record(before, source="event", tz=utc, now=NOW)
        index.settings.set(SettingKey.EVENTS_SECRET_PATH, "callvault-events-kept", NOW)
        index.settings.set(SettingKey.PBX_TIMEZONE, "Europe/Paris", NOW)
        index.settings.set(SettingKey.PBX_HEALTH, '{"state": "ok", "error": null}', NOW)
    migrate(empty_db_url, "0006", down=True)
    with open_index(empty_db_url) as index:
        assert index.schema_revision() == HEAD
        [main] = index.pbxs.list()
        assert (main.name, main.config.url, main.password_sealed) == ("main", "", "")
        assert (main.events_path, main.serial) == ("callvault-events-kept", "S1")
        assert main.config.timezone == "Europe/Paris"
        assert main.session == {"state": "ok", "error": None}  # 0008: the session moved
        rows = index.recordings.search(SearchFilters())
        assert {(row.name, row.pbx_id) for row in rows} == {("a.wav", main.id), ("b.wav", main.id)}
        # The number search still finds the calls from before, and follows new ones.
        assert [r.name for r in index.recordings.search(SearchFilters(number="37052"))] == ["a.wav"]
        # Another PBX may now have the same call id and recording name.
        again = CallDetail(callid="1.1", callfrom="0170999", callto="200", recording="a.wav")
        [result] = index.calls.record([again], source="event", tz=utc, now=NOW, pbx_id=99)
        assert result.new_recording
        assert index.recordings.by_name("a.wav", pbx_id=99) is not None
        assert [r.pbx_id for r in index.recordings.search(SearchFilters(number="0170999"))] == [99]
        [repeat] = index.calls.record(before[:1], source="event", tz=utc, now=NOW, pbx_id=main.id)
        assert not repeat.new_recording  # still one call per (PBX, call id)
        assert index.recordings.counts_by_state()["pending"] == 3


def test_an_empty_index_gets_no_pbx_at_0007(empty_db_url: str) -> None:
    with open_index(empty_db_url) as index:
        assert index.pbxs.list() == []


def test_0007_down_and_up_again_keeps_the_pbx_of_before(empty_db_url: str) -> None:
    detail = CallDetail(callid="1.1", callfrom="100", callto="200", recording="a.wav")
    with open_index(empty_db_url) as index:
        index.calls.record([detail], source="event", tz=ZoneInfo("UTC"), now=NOW)
    for _ in range(2):
        migrate(empty_db_url, "0006", down=True)
        with open_index(empty_db_url) as index:
            assert [(p.id, p.name) for p in index.pbxs.list()] == [(0, "main")]
            assert [r.pbx_id for r in index.recordings.search(SearchFilters())] == [0]
