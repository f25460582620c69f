"""Calls and recordings belong to a PBX of the registry.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

A call id ("epoch.seq") and a recording's name are unique on one PBX only: with several
PBXs in one index, a call is known by (PBX, call id) and a recording by (PBX, name).

- ``calls.pbx_id`` and ``recordings.pbx_id`` (no foreign key: a PBX taken off the
  registry leaves its calls archived); the unique keys become ``(pbx_id, callid)`` and
  ``(pbx_id, name)``.
- An index that holds calls already had one PBX, given by `serve`'s flags: it becomes the
  registry's entry ``main`` with id 0, the id of the archive's PBX of the flags from now on
  (`FLAGS_PBX_ID`), with no address or password yet (its settings come from the flags at
  the next start; its secret report path is the archive's, its serial the one its calls
  carry), and every existing call and recording is its. An empty index gets no entry
  (the first start with flags makes it).

PostgreSQL adds the columns with a default (no rewrite), then builds the two new unique
indexes (2 s for a million calls on a 2-core machine). SQLite cannot drop a table's UNIQUE
constraint in place: ``calls`` and ``recordings`` are copied into new tables (17 and 20 s
for a million calls, 1.8 GB, on a 2-core machine), with foreign keys off for the copy (see
`run_migrations`); the triggers that keep the number search's FTS5 table in step with
``calls`` go with the old table and are made again. An index migrated down to 0006 and up
again keeps its entry 0.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The number search's triggers, as migration 0004 made them.
_SQLITE_TRIGGERS = [
    "CREATE TRIGGER calls_numbers_insert AFTER INSERT ON calls BEGIN "
    "INSERT INTO calls_numbers(rowid, call_from, call_to, did) "
    "VALUES (new.id, new.call_from, new.call_to, new.did); END",
    "CREATE TRIGGER calls_numbers_delete AFTER DELETE ON calls BEGIN "
    "INSERT INTO calls_numbers(calls_numbers, rowid, call_from, call_to, did) "
    "VALUES ('delete', old.id, old.call_from, old.call_to, old.did); END",
    "CREATE TRIGGER calls_numbers_update AFTER UPDATE OF call_from, call_to, did ON calls "
    "WHEN old.call_from IS NOT new.call_from OR old.call_to IS NOT new.call_to "
    "OR old.did IS NOT new.did BEGIN "
    "INSERT INTO calls_numbers(calls_numbers, rowid, call_from, call_to, did) "
    "VALUES ('delete', old.id, old.call_from, old.call_to, old.did); "
    "INSERT INTO calls_numbers(rowid, call_from, call_to, did) "
    "VALUES (new.id, new.call_from, new.call_to, new.did); END",
]

_pbxs = sa.table(
    "pbxs",
    sa.column("id", sa.Integer()),
    sa.column("name", sa.String()),
    sa.column("url", sa.String()),
    sa.column("username", sa.String()),
    sa.column("password_sealed", sa.Text()),
    sa.column("api_version", sa.String()),
    sa.column("insecure", sa.Boolean()),
    sa.column("tls_min_version", sa.String()),
    sa.column("timezone", sa.String()),
    sa.column("max_downloads", sa.Integer()),
    sa.column("events_path", sa.String()),
    sa.column("events_allow", sa.Text()),
    sa.column("serial", sa.String()),
    sa.column("detail", sa.Text()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)


def _setting(bind: sa.Connection, key: str) -> str | None:
    value = bind.execute(
        sa.text("SELECT value FROM settings WHERE key = :key"), {"key": key}
    ).scalar()
    return None if value is None else str(value)


def _register_the_pbx_of_before(bind: sa.Connection) -> None:
    """The registry entry (id 0) of the PBX whose calls the index holds, if it holds any
    (and has no such entry yet: an index migrated down and up again keeps its own)."""
    if bind.execute(sa.text("SELECT 1 FROM calls LIMIT 1")).first() is None:
        return
    if bind.execute(sa.text("SELECT 1 FROM pbxs WHERE id = 0")).first() is not None:
        return
    serial = bind.execute(
        sa.text("SELECT pbx_serial FROM calls WHERE pbx_serial <> '' ORDER BY id DESC LIMIT 1")
    ).scalar()
    now = datetime.now(UTC)
    path = _setting(bind, "events_secret_path")
    if path is None:  # where serve will tell the PBX to post, kept in both places
        path = "callvault-events-" + secrets.token_urlsafe(24)
        bind.execute(
            sa.text("INSERT INTO settings (key, value, updated_at) VALUES (:k, :v, :at)"),
            {"k": "events_secret_path", "v": path, "at": now},
        )
    bind.execute(
        _pbxs.insert().values(
            id=0,  # the archive's PBX of serve's flags, now and later (FLAGS_PBX_ID)
            name="main",
            url="",  # filled in from serve's flags at its next start
            username="",
            password_sealed="",  # from the environment, as before
            api_version="v1.1.0",
            insecure=False,
            tls_min_version="1.2",
            timezone=_setting(bind, "pbx_timezone"),
            max_downloads=2,
            events_path=path[:64],
            events_allow="",
            serial=str(serial or "")[:64],
            detail="{}",
            created_at=now,
            updated_at=now,
        )
    )


def upgrade() -> None:
    bind = op.get_bind()
    _register_the_pbx_of_before(bind)
    default = sa.text("0")
    for table in ("calls", "recordings"):
        op.add_column(
            table, sa.Column("pbx_id", sa.Integer(), nullable=False, server_default=default)
        )
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("calls", recreate="always") as batch:
            batch.alter_column("pbx_id", existing_type=sa.Integer(), server_default=None)
            batch.drop_constraint("uq_calls_callid", type_="unique")
            batch.create_unique_constraint("uq_calls_pbx_id_callid", ["pbx_id", "callid"])
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)
        with op.batch_alter_table("recordings", recreate="always") as batch:
            batch.alter_column("pbx_id", existing_type=sa.Integer(), server_default=None)
            batch.drop_constraint("uq_recordings_name", type_="unique")
            batch.create_unique_constraint("uq_recordings_pbx_id_name", ["pbx_id", "name"])
        op.execute("ANALYZE")
        return
    for table in ("calls", "recordings"):
        op.alter_column(table, "pbx_id", server_default=None)
    op.create_unique_constraint("uq_calls_pbx_id_callid", "calls", ["pbx_id", "callid"])
    op.drop_constraint("uq_calls_callid", "calls", type_="unique")
    op.create_unique_constraint("uq_recordings_pbx_id_name", "recordings", ["pbx_id", "name"])
    op.drop_constraint("uq_recordings_name", "recordings", type_="unique")


def downgrade() -> None:
    """Back to one key per call id and recording name: refused when two PBXs share one."""
    bind = op.get_bind()
    for table, key in (("calls", "callid"), ("recordings", "name")):
        # Constants only in this statement, no outside input: S608 does not apply.
        shared = bind.execute(
            sa.text(f"SELECT {key} FROM {table} GROUP BY {key} HAVING count(*) > 1 LIMIT 1")  # noqa: S608
        ).first()
        if shared is not None:
            raise RuntimeError(
                f"cannot downgrade: two PBXs have the same {key} {shared[0]!r} in {table}"
            )
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("calls", recreate="always") as batch:
            batch.drop_constraint("uq_calls_pbx_id_callid", type_="unique")
            batch.create_unique_constraint("uq_calls_callid", ["callid"])
            batch.drop_column("pbx_id")
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)
        with op.batch_alter_table("recordings", recreate="always") as batch:
            batch.drop_constraint("uq_recordings_pbx_id_name", type_="unique")
            batch.create_unique_constraint("uq_recordings_name", ["name"])
            batch.drop_column("pbx_id")
        return
    op.create_unique_constraint("uq_calls_callid", "calls", ["callid"])
    op.drop_constraint("uq_calls_pbx_id_callid", "calls", type_="unique")
    op.drop_column("calls", "pbx_id")
    op.create_unique_constraint("uq_recordings_name", "recordings", ["name"])
    op.drop_constraint("uq_recordings_pbx_id_name", "recordings", type_="unique")
    op.drop_column("recordings", "pbx_id")
