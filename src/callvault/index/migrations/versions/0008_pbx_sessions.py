"""Each PBX's session health in its registry entry.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

- ``pbxs.session``: the PBX API session's health as the `serve` archiving that PBX last
  reported it (JSON: state, error, last contact). It was one setting, ``pbx_health``, which
  two `serve` processes archiving two PBXs into one index overwrote in turn. What that
  setting holds is copied to the archive's PBX of serve's flags (entry 0), if it exists.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "pbxs", sa.Column("session", sa.Text(), nullable=False, server_default=sa.text("'{}'"))
    )
    op.execute(
        "UPDATE pbxs SET session = (SELECT value FROM settings WHERE key = 'pbx_health') "
        "WHERE id = 0 AND EXISTS (SELECT 1 FROM settings WHERE key = 'pbx_health')"
    )


def downgrade() -> None:
    with op.batch_alter_table("pbxs") as batch:
        batch.drop_column("session")
