"""History to archive, asked of the node that works on a PBX.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04

- ``backfill_requests``: `callvault backfill` while a `serve` node holds the PBX's lease
  asks that node to read the history (one API session per PBX, always); the node claims
  the request, notes its progress, and marks it ``done`` or ``failed``.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfill_requests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "pbx_id",
            sa.Integer(),
            sa.ForeignKey("pbxs.id", ondelete="CASCADE", name="fk_backfill_requests_pbx_id_pbxs"),
            nullable=False,
        ),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=False, server_default=sa.text("''")),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("node", sa.String(128), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("progress", sa.Text(), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("error", sa.Text(), nullable=False, server_default=sa.text("''")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_backfill_requests_pbx_state", "backfill_requests", ["pbx_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_backfill_requests_pbx_state", table_name="backfill_requests")
    op.drop_table("backfill_requests")
