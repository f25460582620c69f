"""The index: the database of every call and recording the archiver knows about.

Open it with `open_index(url)`; the tables are described in `callvault.index.schema`.
The archiver records calls (`Index.record_calls`), workers claim and finish download jobs
(`claim_jobs`, `mark_archived`, `mark_retry`, `mark_missing`, `mark_failed`), and people
search it (`search`, `count`). See `Index` for the whole surface.
"""

from __future__ import annotations

from callvault.index._index import (
    Index,
    IndexMissingError,
    IndexOpenError,
    InvalidCallDetail,
    from_db,
    open_index,
    parse_timestart,
    sqlite_path,
    to_utc,
)
from callvault.index._models import Job, RecordingRow, RecordResult, SearchFilters

__all__ = [
    "Index",
    "IndexMissingError",
    "IndexOpenError",
    "InvalidCallDetail",
    "Job",
    "RecordResult",
    "RecordingRow",
    "SearchFilters",
    "from_db",
    "open_index",
    "parse_timestart",
    "sqlite_path",
    "to_utc",
]
