"""The archiver: receive the PBX's events, download every recording, keep it safe.

Joins the protocol (`callvault.pbx`), the index and the storage (DESIGN.md, data flow):

    PBX --NewCdr--> receiver --group commit--> index (pending) --> 200
    workers: claim --> download (staging) --> storage.put_file --> index: archived
    CDR export (day windows) --> backfill / reconcile --> the same jobs

Public API::

    Archiver(config: ArchiverConfig, *, transport=None, on_archived=None)
        .run(stop: asyncio.Event)          # the service as a coroutine (callvault serve)
        .start() / .stop() / with ...:     # in a background thread (demo, tests)
        .events_url, .events_port, .secret_path, .index, .storage, .session, .pool
    backfill(client, index, *, since, until, tz, ...) -> BackfillStats
    reconcile(client, index, *, hours, tz, ...) -> BackfillStats
    RetryPolicy, after_not_found, after_transient, after_permanent  # pure decisions
"""

from callvault.archive._backfill import (
    BackfillStats,
    backfill,
    ingest_window,
    queued_counts,
    reconcile,
    windows,
)
from callvault.archive._commit import GroupCommitter
from callvault.archive._policy import (
    Decision,
    RetryPolicy,
    after_not_found,
    after_permanent,
    after_transient,
)
from callvault.archive._receiver import (
    SourceAllowList,
    create_receiver_app,
    new_secret_path,
    validate_cdr,
)
from callvault.archive._service import Archiver, ArchiverConfig
from callvault.archive._session import PbxSession
from callvault.archive._workers import Archived, WorkerPool

__all__ = [
    "Archived",
    "Archiver",
    "ArchiverConfig",
    "BackfillStats",
    "Decision",
    "GroupCommitter",
    "PbxSession",
    "RetryPolicy",
    "SourceAllowList",
    "WorkerPool",
    "after_not_found",
    "after_permanent",
    "after_transient",
    "backfill",
    "create_receiver_app",
    "ingest_window",
    "new_secret_path",
    "queued_counts",
    "reconcile",
    "validate_cdr",
    "windows",
]
