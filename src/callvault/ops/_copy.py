"""`callvault index copy`: the whole index into another, empty database (from SQLite
on one machine to PostgreSQL for several nodes), checked row count by row count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from callvault.index import Index, IndexCopyError, audit, redact
from callvault.ops._archive import Archive
from callvault.ops._json import JsonResult

AUDIT_ACTION = audit.INDEX_COPY


@dataclass(frozen=True, slots=True)
class IndexCopyReport(JsonResult):
    """What a copy did: the rows of each table, in the source and now in the target."""

    source: str
    target: str
    rows: dict[str, int]


def copy_index(
    archive: Archive,
    target: Index,
    target_url: str,
    *,
    actor: str,
    now: Callable[[], datetime],
    progress: Callable[[str, int, int], None] | None = None,
) -> IndexCopyReport:
    """Copy every row of the archive's index into `target` (empty, at the newest schema:
    `open_index` makes it so), then check that each table holds as many rows as the
    source's. The source is left as it was: from then on, give every command and node the
    target's URL. ArchiveError (one line) if a serve is running: what it records
    meanwhile would stay behind; IndexCopyError if the target holds rows already."""
    archive.refuse_while_serving(now(), "the calls it records meanwhile stay behind")
    source = archive.index
    copied = source.copy_into(target, progress=progress)
    there = target.row_counts()
    wrong = [name for name, rows in copied.items() if there.get(name) != rows]
    if wrong:  # pragma: no cover - only a database that loses committed rows
        raise IndexCopyError(
            f"the copy of table {wrong[0]} does not hold every row: do not use the target"
        )
    detail = f"{sum(copied.values())} rows into {redact(target_url)}"
    source.audit.record(actor, AUDIT_ACTION, "index", detail, "", at=now())
    target.audit.record(actor, AUDIT_ACTION, "index", detail, "", at=now())
    return IndexCopyReport(source=source.redacted_url, target=redact(target_url), rows=copied)
