"""Retention policies, legal holds and deleted recordings' tombstones.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04

- ``recordings.deleted_at``, ``purged_at`` and ``deletion``: a recording deleted (state
  ``deleted``) keeps its row, hash and size, with when and why;
- ``retention_policies``: every version of the retention rules;
- ``holds`` and ``hold_recordings``: legal holds and what each holds.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("recordings", sa.Column("deleted_at", sa.DateTime(timezone=True)))
    op.add_column("recordings", sa.Column("purged_at", sa.DateTime(timezone=True)))
    op.add_column("recordings", sa.Column("deletion", sa.Text()))
    op.create_table(
        "retention_policies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("rules", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=sa.text("''")),
        sa.Column("note", sa.Text(), nullable=False, server_default=sa.text("''")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "holds",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("case_name", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("selection", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=sa.text("''")),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(64), nullable=True),
        sa.Column("release_reason", sa.Text(), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "hold_recordings",
        sa.Column(
            "hold_id",
            sa.Integer(),
            sa.ForeignKey("holds.id", ondelete="CASCADE", name="fk_hold_recordings_hold_id_holds"),
            primary_key=True,
        ),
        sa.Column(
            "recording_id",
            sa.Integer(),
            sa.ForeignKey(
                "recordings.id",
                ondelete="CASCADE",
                name="fk_hold_recordings_recording_id_recordings",
            ),
            primary_key=True,
        ),
    )
    op.create_index("ix_hold_recordings_recording_id", "hold_recordings", ["recording_id"])


def downgrade() -> None:
    op.drop_index("ix_hold_recordings_recording_id", table_name="hold_recordings")
    op.drop_table("hold_recordings")
    op.drop_table("holds")
    op.drop_table("retention_policies")
    with op.batch_alter_table("recordings") as batch:
        batch.drop_column("deletion")
        batch.drop_column("purged_at")
        batch.drop_column("deleted_at")
