"""Alerts: what is wrong now, and whether it was told.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

- ``alerts``: one row per condition (``key``, e.g. ``pbx:paris:down``), seen first at
  ``first_seen_at``, told at ``fired_at`` (None until its delay passed and one node
  claimed the telling), cleared at ``resolved_at``. The conditional updates on these
  columns make each alert and each all-clear go out once, whichever nodes evaluate.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("key", sa.String(160), primary_key=True),
        sa.Column("summary", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("detail", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("alerts")
