"""Encryption at rest: each encrypted recording's sealed data key.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04

- ``recordings.data_key``: the recording's own data key, sealed with the master keyring
  (``callvault.keys``, context ``recording:<id>``); NULL for a recording stored in clear
  (everything archived before, or with encryption off).

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("recordings", sa.Column("data_key", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recordings") as batch:
        batch.drop_column("data_key")
