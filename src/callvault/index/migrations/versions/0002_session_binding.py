"""Web sessions bound to their user, and logouts kept in the index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-16

- ``users`` never reuses an id: on SQLite the table is rebuilt with AUTOINCREMENT (without
  it SQLite hands the highest id of a removed user to the next new one, and that user would
  inherit the removed one's session cookies). PostgreSQL's serial sequence never reuses an
  id, so there only the column below is added.
- ``users.session_epoch``: a random value each session cookie carries and is checked
  against; existing users get one each (sessions from before this version end: their
  cookies carry none).
- ``revoked_sessions``: logged-out sessions until they would have expired, so a logout
  holds across restarts and in every app over the same index.

Written out in full (not imported from schema.py), like 0001.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_KEPT_COLUMNS = "id, user_id, label, token_sha256, created_at, created_by, revoked_at, last_used_at"
_KEEP = "_callvault_0002_api_tokens"

_users = sa.table("users", sa.column("id", sa.Integer()), sa.column("session_epoch", sa.String()))


def _rebuild_users_on_sqlite(autoincrement: bool, change: str) -> None:
    """Rebuild ``users`` (batch mode), keeping every API token.

    Rebuilding drops the old table. Foreign keys are on for the index's connections and
    cannot be switched off inside the transaction a migration runs in, so that drop
    would delete every API token through ``ON DELETE CASCADE``: they are copied aside
    first and put back once the new table holds the same user ids.
    """
    # Constants only in these statements, no outside input: S608 does not apply.
    op.execute(f"CREATE TEMP TABLE {_KEEP} AS SELECT {_KEPT_COLUMNS} FROM api_tokens")  # noqa: S608
    with op.batch_alter_table(
        "users", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
    ) as batch:
        if change == "epoch not null":
            batch.alter_column("session_epoch", existing_type=sa.String(32), nullable=False)
        else:
            batch.drop_column("session_epoch")
    op.execute("DELETE FROM api_tokens")  # none left after the cascade; to be sure
    op.execute(f"INSERT INTO api_tokens ({_KEPT_COLUMNS}) SELECT {_KEPT_COLUMNS} FROM {_KEEP}")  # noqa: S608
    op.execute(f"DROP TABLE {_KEEP}")


def upgrade() -> None:
    bind = op.get_bind()
    op.add_column("users", sa.Column("session_epoch", sa.String(length=32), nullable=True))
    for (user_id,) in bind.execute(sa.select(_users.c.id)).all():
        bind.execute(
            sa.update(_users)
            .where(_users.c.id == user_id)
            .values(session_epoch=secrets.token_urlsafe(12))
        )
    if bind.dialect.name == "sqlite":
        _rebuild_users_on_sqlite(autoincrement=True, change="epoch not null")
    else:
        op.alter_column(
            "users", "session_epoch", existing_type=sa.String(length=32), nullable=False
        )

    op.create_table(
        "revoked_sessions",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name="pk_revoked_sessions"),
    )
    op.create_index("ix_revoked_sessions_expires_at", "revoked_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_revoked_sessions_expires_at", table_name="revoked_sessions")
    op.drop_table("revoked_sessions")
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_users_on_sqlite(autoincrement=False, change="drop epoch")
    else:
        op.drop_column("users", "session_epoch")
