"""`Index.copy_into`: every row of one index into another, empty one (SQLite to
PostgreSQL, the way from one machine to several; or back).

The target is made at the newest schema by `open_index`. The rows go table by table in
the order of their foreign keys, a thousand at a time, all in one transaction of the
target: an interrupted copy leaves the target as empty as it was, and running it again
starts over. Datetimes read without a zone (SQLite keeps none) are UTC, as everything
the index stores. On PostgreSQL the id sequences are then moved past the copied ids, and
the planner's statistics gathered; on SQLite the number search's trigram table is
filled by its triggers as the calls arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Integer, Table, func, insert, select, text

from callvault.index._db import Database
from callvault.index.schema import metadata

_BATCH = 1000


class IndexCopyError(ValueError):
    """The copy cannot be made: one line for a person."""


def tables() -> list[Table]:
    """Every table of the index, each after those its foreign keys point to."""
    return list(metadata.sorted_tables)


def row_counts(db: Database) -> dict[str, int]:
    with db.read() as conn:
        return {
            table.name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
            for table in tables()
        }


def copy_rows(
    source: Database,
    target: Database,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, int]:
    """Copy every row of `source` into `target` (see the module docstring); the rows
    copied per table. IndexCopyError if `target` holds any row already."""
    counts = row_counts(source)
    taken = {name: rows for name, rows in row_counts(target).items() if rows}
    if taken:
        name, rows = next(iter(taken.items()))
        raise IndexCopyError(
            f"the target index is not empty (table {name} has {rows} rows): copy into a new, "
            "empty database"
        )
    copied: dict[str, int] = {}
    with target.write() as writing, source.read() as reading:
        for table in tables():
            stamps = [c.name for c in table.columns if isinstance(c.type, DateTime)]
            done = 0
            result = reading.execution_options(yield_per=_BATCH).execute(
                select(table).order_by(*table.primary_key.columns)
            )
            for batch in result.mappings().partitions(_BATCH):
                values = [_utc_stamps(dict(row), stamps) for row in batch]
                writing.execute(insert(table), values)
                done += len(values)
                if progress is not None:
                    progress(table.name, done, counts[table.name])
            copied[table.name] = done
        if target.dialect == "postgresql":
            for table in tables():
                _move_sequence(writing, table)
    if target.dialect == "postgresql":
        with target.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    return copied


def _utc_stamps(row: dict[str, Any], stamps: list[str]) -> dict[str, Any]:
    for name in stamps:
        value = row.get(name)
        if isinstance(value, datetime) and value.tzinfo is None:
            row[name] = value.replace(tzinfo=UTC)
    return row


def _move_sequence(conn: Any, table: Table) -> None:
    """Past the copied ids: the next row made on PostgreSQL gets a new one."""
    keys = list(table.primary_key.columns)
    if len(keys) != 1 or keys[0].name != "id" or keys[0].autoincrement is False:
        return
    if not isinstance(keys[0].type, Integer):  # e.g. signing_keys: named by fingerprint
        return
    conn.execute(
        text(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "  # noqa: S608
            f"coalesce(max(id), 1), max(id) IS NOT NULL) FROM {table.name}"
        )
    )
