"""Claims owned by registered processes, and web sessions kept as rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-06-01

- ``processes``: one row per callvault process that claims download jobs, with its
  heartbeat; ids are never reused (AUTOINCREMENT on SQLite).
- ``recordings.claim_process_id`` (indexed, no foreign key): the process whose worker holds
  the claim, so a claim of a stopped or silent process is released at once instead of when
  its lease runs out. Claims in flight during the upgrade have none: their lease applies.
- ``web_sessions`` replaces ``revoked_sessions``: a session is live only while its row
  exists (logging out deletes it), so the signing secret alone cannot make a session. Every
  session from before this version ends (none has a row): users log in again.

Written out in full (not imported from schema.py), like 0001 and 0002.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "processes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("workers_configured", sa.Integer(), nullable=False),
        sa.Column("workers_alive", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_processes"),
        sqlite_autoincrement=True,
    )

    op.add_column("recordings", sa.Column("claim_process_id", sa.Integer(), nullable=True))
    op.create_index("ix_recordings_claim_process_id", "recordings", ["claim_process_id"])

    op.create_table(
        "web_sessions",
        sa.Column("nonce_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name="fk_web_sessions_user_id_users",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("nonce_sha256", name="pk_web_sessions"),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])

    op.drop_index("ix_revoked_sessions_expires_at", table_name="revoked_sessions")
    op.drop_table("revoked_sessions")


def downgrade() -> None:
    op.create_table(
        "revoked_sessions",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name="pk_revoked_sessions"),
    )
    op.create_index("ix_revoked_sessions_expires_at", "revoked_sessions", ["expires_at"])

    op.drop_index("ix_web_sessions_expires_at", table_name="web_sessions")
    op.drop_index("ix_web_sessions_user_id", table_name="web_sessions")
    op.drop_table("web_sessions")

    op.drop_index("ix_recordings_claim_process_id", table_name="recordings")
    with op.batch_alter_table("recordings") as batch:
        batch.drop_column("claim_process_id")

    op.drop_table("processes")
