"""Every Yeastar PBX: each registered PBX's kind, and the P-Series token cache.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04

- ``pbxs.kind``: which API the PBX speaks: ``s-series`` (every PBX registered before),
  ``cloud`` (the S-Series-based Yeastar Cloud PBX: refresh tokens) or ``p-series`` (the
  P-Series OpenAPI: Client ID and Secret, download URLs, WebSocket events).
- ``pbxs.tokens_sealed``: a P-Series PBX's live access and refresh tokens with their
  expiry, sealed with the master keyring (context ``pbx:<name>:tokens``), so that a restart
  or another node reuses them instead of spending one of the application's eight tokens;
  NULL when there are none.
- ``pbxs.webhook_secret_sealed``: a P-Series PBX's webhook Secret (Integrations > API >
  Webhook Event Push; it signs each event the PBX pushes, ``X-Signature``), sealed with the
  master keyring (context ``pbx:<name>:webhook``); NULL when it has none.

- ``pbxs.tcp_report_port``: the port an S-Series v2 PBX set to report over TCP (Report
  Method = TCP) takes its app servers' connections on; NULL: it reports over HTTP.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pbxs") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(16), nullable=False, server_default="s-series")
        )
        batch.add_column(sa.Column("tokens_sealed", sa.Text(), nullable=True))
        batch.add_column(sa.Column("webhook_secret_sealed", sa.Text(), nullable=True))
        batch.add_column(sa.Column("tcp_report_port", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pbxs") as batch:
        batch.drop_column("tcp_report_port")
        batch.drop_column("webhook_secret_sealed")
        batch.drop_column("tokens_sealed")
        batch.drop_column("kind")
