"""The registry of PBXs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

- ``pbxs``: one row per PBX the deployment archives (`callvault pbx add`): its URL, API
  user, password sealed with the master key, API version, how its certificate is trusted,
  time zone, download concurrency, the secret path and sources of its reports, and the
  serial its reports name it by. Ids are never reused (AUTOINCREMENT on SQLite).

An archive from before stays as it was: its PBX is still given by `serve`'s flags (or
config) until it is registered. Nothing else changes.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pbxs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("url", sa.String(length=255), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_sealed", sa.Text(), nullable=False),
        sa.Column("api_version", sa.String(length=16), nullable=False),
        sa.Column("ca_file", sa.String(length=1024), nullable=True),
        sa.Column("pin_sha256", sa.String(length=64), nullable=True),
        sa.Column("insecure", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("tls_min_version", sa.String(length=8), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("max_downloads", sa.Integer(), nullable=False),
        sa.Column("events_path", sa.String(length=64), nullable=False),
        sa.Column("events_allow", sa.Text(), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_pbxs"),
        sa.UniqueConstraint("name", name="uq_pbxs_name"),
        sa.UniqueConstraint("events_path", name="uq_pbxs_events_path"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("pbxs")
