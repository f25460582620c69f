"""The tamper-evident audit log and the deployment's signing keys.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04

- ``audit_log.seq`` and ``audit_log.hash``: each entry's place in the hash chain and
  its link (entries already there are chained, in the order of their ids, by the first
  write after this migration: the chain's rules live in one place, `index.audit`);
- ``audit_head``: the chain's last seq and hash (one row, made by that first write);
- ``audit_checkpoints``: signed statements "the chain up to seq N has hash H";
- ``signing_keys``: the deployment's Ed25519 keys, the private half sealed;
- ``recordings.audit_seq``: the chain entry that attests a recording's hash and size.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.add_column("audit_log", sa.Column("hash", sa.String(64), nullable=True))
    op.create_index("ix_audit_log_seq", "audit_log", ["seq"], unique=True)
    op.add_column("recordings", sa.Column("audit_seq", sa.BigInteger(), nullable=True))
    op.create_index("ix_recordings_audit_seq", "recordings", ["audit_seq"])
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_checkpoints_seq", "audit_checkpoints", ["seq"])
    op.create_table(
        "signing_keys",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("private_sealed", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("signing_keys")
    op.drop_index("ix_audit_checkpoints_seq", table_name="audit_checkpoints")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_head")
    op.drop_index("ix_recordings_audit_seq", table_name="recordings")
    with op.batch_alter_table("recordings") as batch:
        batch.drop_column("audit_seq")
    op.drop_index("ix_audit_log_seq", table_name="audit_log")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("hash")
        batch.drop_column("seq")
