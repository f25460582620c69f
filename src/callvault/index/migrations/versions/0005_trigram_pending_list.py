"""PostgreSQL: keep the trigram indexes' lists of pending entries short.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

A GIN index takes new entries into a list of pending ones, unsorted, merged into the index
proper when the list outgrows ``gin_pending_list_limit`` (4 MB by default) or when
(auto)vacuum runs. Every search through the index reads the whole list. At ten million
calls, after a bulk load on a server without autovacuum, the ``call_to`` index held 26,555
pending entries: a number search took 63 ms (median), 49 ms once they were merged. With a
limit of 256 kB a search reads at most a sixteenth of that, wherever the list stands;
inserts merge smaller lists more often, which cost about a tenth of the calls recorded a
second (4,840 against 5,350 in a bulk load).

This merges what is pending now and sets the limit on each trigram index there is (a
server that refused ``pg_trgm`` has none: nothing to do). SQLite's trigram table is an FTS5
table, which has no such list: nothing changes there.

Written out in full (not imported from schema.py), like the migrations before it.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_INDEXES = ("ix_calls_call_from_trgm", "ix_calls_call_to_trgm", "ix_calls_did_trgm")
_PENDING_LIST_KB = 256


def _present(names: tuple[str, ...]) -> list[str]:
    bind = op.get_bind()
    return [
        name
        for name in names
        if bind.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar() is not None
    ]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for name in _present(_INDEXES):
        op.execute(f"ALTER INDEX {name} SET (gin_pending_list_limit = {_PENDING_LIST_KB})")
        op.execute(f"SELECT gin_clean_pending_list('{name}'::regclass)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for name in _present(_INDEXES):
        op.execute(f"ALTER INDEX {name} RESET (gin_pending_list_limit)")
