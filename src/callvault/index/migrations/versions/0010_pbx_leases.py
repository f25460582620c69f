"""Leases: which node owns each PBX's API session.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04

- ``pbx_leases``: one row per PBX some node has held (made on first acquisition). ``node``
  owns the PBX until ``expires_at`` (None when released); ``token`` counts the
  acquisitions and is the fencing token: a holder renews or releases only while the row
  still carries its token, so one that lost the PBX (paused, cut off) cannot renew it.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pbx_leases",
        sa.Column(
            "pbx_id",
            sa.Integer(),
            sa.ForeignKey("pbxs.id", ondelete="CASCADE", name="fk_pbx_leases_pbx_id_pbxs"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("node", sa.String(128), nullable=True),
        sa.Column("token", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("pbx_leases")
