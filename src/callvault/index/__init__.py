"""The index: the database of every call and recording the archiver knows about.

Open it with `open_index(url)`; the tables are described in `callvault.index.schema`.
The `Index` has one store per subject, each method one short transaction:

- `index.calls.record(...)`: the receiver and backfill store call detail records;
- `index.jobs`: workers claim download jobs (`claim`) as a `Worker` of a registered
  process, and report them (`mark_archived`, `mark_retry`, `mark_missing`, `mark_failed`);
- `index.recordings`: people search (`search`, `count`) and look up recordings;
- `index.settings`: small facts under the keys of `SettingKey`;
- `index.users`, `index.tokens`, `index.sessions`: the web app's users, API tokens and
  sessions (rules and data classes in `callvault.index.users`);
- `index.audit`: the audit log (actions and entries in `callvault.index.audit`);
- `index.processes`: the registry of processes whose workers claim jobs;
- `index.pbxs`: the registry of PBXs (rules and data classes in `callvault.index.pbxs`);
- `index.leases`: which node owns each PBX's API session, with fencing tokens;
- `index.notices`: "this PBX has new jobs", from node to node (PostgreSQL's NOTIFY);
- `index.alerts`: what is wrong now, each told once and cleared once across nodes;
- `index.backfills`: history to archive, asked of the node that works on a PBX;
- `index.signing_keys`: the deployment's Ed25519 keys (the private half sealed);
- `index.retention`: the retention policy's versions, legal holds, deleting recordings
  (rules and data types in `callvault.index.retention`).

Errors: `IndexFailure` (one line for a person) with `IndexOpenError`, `IndexMissingError`
and `IndexCorruptError`; `InvalidCallDetail` (a ValueError) for a record that cannot be
stored, whose reason `call_detail_problem(cdr, tz)` gives without touching the database.
`index.check()` asks the database whether it is damaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from callvault._lazy import lazy_exports
from callvault.index._db import redact, sqlite_path

if TYPE_CHECKING:
    from callvault.index._calls import call_detail_problem
    from callvault.index._jobs import DEFAULT_STALE_AFTER
from callvault.index._alerts import Alert
from callvault.index._backfills import BackfillRequest
from callvault.index._copy import IndexCopyError
from callvault.index._errors import (
    IndexCorruptError,
    IndexFailure,
    IndexMissingError,
    IndexOpenError,
    InvalidCallDetail,
)
from callvault.index._index import Index, open_index
from callvault.index._models import (
    ArchivedCopy,
    DayCount,
    Job,
    Lease,
    Position,
    ProcessInfo,
    RecordingRow,
    RecordResult,
    Scope,
    SearchFilters,
    SubjectCall,
    Total,
    Worker,
)
from callvault.index._recordings import TOTAL_CAP
from callvault.index._settings import SettingKey

__all__ = [
    "DEFAULT_STALE_AFTER",
    "TOTAL_CAP",
    "Alert",
    "ArchivedCopy",
    "BackfillRequest",
    "DayCount",
    "Index",
    "IndexCopyError",
    "IndexCorruptError",
    "IndexFailure",
    "IndexMissingError",
    "IndexOpenError",
    "InvalidCallDetail",
    "Job",
    "Lease",
    "Position",
    "ProcessInfo",
    "RecordResult",
    "RecordingRow",
    "Scope",
    "SearchFilters",
    "SettingKey",
    "SubjectCall",
    "Total",
    "Worker",
    "call_detail_problem",
    "open_index",
    "redact",
    "sqlite_path",
]


__getattr__ = lazy_exports(
    __name__, {"call_detail_problem": "_calls", "DEFAULT_STALE_AFTER": "_jobs"}
)
