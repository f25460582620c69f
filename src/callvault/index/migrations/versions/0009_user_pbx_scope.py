"""Users may be limited to some PBXs.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

- ``users.pbxs``: the PBXs of the registry whose calls the user may see, by name,
  comma-separated; empty (every user so far) for every PBX. It narrows ``scope`` (the
  extensions), which applies on every PBX the user may see.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "users", sa.Column("pbxs", sa.Text(), nullable=False, server_default=sa.text("''"))
    )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("pbxs")
