"""A PBX may post its reports to an address of our choosing.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04

- ``pbxs.report_url``: ``HOST:PORT`` the PBX is told to post its reports to (login's
  ``urltag=1``), e.g. a load balancer in front of several nodes; NULL (every PBX so far)
  for the address of the node that logged in, as before.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pbxs", sa.Column("report_url", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pbxs") as batch:
        batch.drop_column("report_url")
