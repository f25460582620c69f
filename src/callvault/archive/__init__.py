"""The archiver: receive the PBX's events, download every recording, keep it safe.

Joins the protocol (`callvault.pbx`), the index and the storage (docs/architecture.md):

    PBX --NewCdr--> receiver --group commit--> index (pending) --> 200
    workers: claim --> download (staging) --> storage.put_file --> index: archived
    CDR export (day windows) --> backfill / reconcile --> the same jobs

Public API::

    Archiver(config: ArchiverConfig, *, transport=None, on_archived=None,
             web_app_factory=None)
        .run(stop: asyncio.Event, *, ready=None)   # the service (callvault serve);
                                                   # raises Fenced if superseded
        .start() / .stop() / with ...:     # in a background thread (demo, tests)
        .events_url, .events_port, .web_port, .secret_path, .index, .storage,
        .session, .pool, .downloads, .committer
    open_storage(path, url=None) -> Storage; save_pbx_timezone(index, tz)
    storage_url_for(index, given, archive_dir, adopt=False) -> str | None  # where the
        # recordings are (StorageMismatch: not where --storage says); same_place(a, b, dir)
    StartError, ArchiveDirError, Fenced        # one-line errors for people

    Downloads(index, storage, client, *, tz, kind, node, options=PoolOptions(),
              session=None, on_archived=None, on_auth_failure=None)
        async with ... as pool / .start() -> WorkerPool / .stop(); .fenced
    drain(index, storage, client, *, tz, node=None, options=None, patience_s=60,
          on_progress=None) -> DrainResult       # backfill's downloads
    WorkerPool(...).run(stop, grace_s=...), .wake(), .configured, .alive, .busy, .fence()
    ProcessRegistration.register(index, *, node, kind, workers) / .heartbeat / .stop
    default_node(), backfill_node(node=None)

    backfill(client, index, *, since, until, tz, ...) -> BackfillStats
    reconcile(client, index, *, hours, tz, ...) -> BackfillStats
    RetryPolicy, after_not_found, after_transient, after_permanent  # pure decisions
"""

from typing import TYPE_CHECKING

from callvault._lazy import lazy_exports

if TYPE_CHECKING:
    from callvault.archive._alerts import Alerter, AlertSettings, Notice
    from callvault.archive._backfill import BackfillStats, backfill, ingest_window, reconcile
    from callvault.archive._commit import GroupCommitter
    from callvault.archive._downloads import (
        DEFAULT_PATIENCE_S,
        Downloads,
        DrainResult,
        PoolOptions,
        drain,
        queued_counts,
    )
    from callvault.archive._metrics import ArchiverMetrics, ServiceProbe
    from callvault.archive._policy import (
        Decision,
        RetryPolicy,
        after_not_found,
        after_permanent,
        after_transient,
    )
    from callvault.archive._process import (
        NODE_KIND,
        Fenced,
        ProcessRegistration,
        backfill_node,
        default_node,
        process_alive,
    )
    from callvault.archive._receiver import (
        SourceAllowList,
        create_receiver_app,
        new_secret_path,
        validate_cdr,
    )
    from callvault.archive._service import (
        ArchiveDirError,
        Archiver,
        ArchiverConfig,
        PbxTarget,
        RegistryView,
        StartError,
        given_pbx_entry,
        open_storage,
        save_pbx_timezone,
    )
    from callvault.archive._session import PASSWORD_UNOPENED, PbxSession
    from callvault.archive._tokens import IndexTokenStore
    from callvault.archive._where import StorageMismatch, same_place, storage_url_for
    from callvault.archive._workers import Archived, WorkerPool

# Each name is imported from its module on first use: `callvault list` (which asks
# `storage_url_for` where the recordings are) does not load the archiver and its PBX
# client.
_HOMES = {
    "Alerter": "_alerts",
    "AlertSettings": "_alerts",
    "Notice": "_alerts",
    "BackfillStats": "_backfill",
    "backfill": "_backfill",
    "ingest_window": "_backfill",
    "reconcile": "_backfill",
    "GroupCommitter": "_commit",
    "DEFAULT_PATIENCE_S": "_downloads",
    "Downloads": "_downloads",
    "DrainResult": "_downloads",
    "PoolOptions": "_downloads",
    "drain": "_downloads",
    "queued_counts": "_downloads",
    "ArchiverMetrics": "_metrics",
    "ServiceProbe": "_metrics",
    "Decision": "_policy",
    "RetryPolicy": "_policy",
    "after_not_found": "_policy",
    "after_permanent": "_policy",
    "after_transient": "_policy",
    "NODE_KIND": "_process",
    "Fenced": "_process",
    "ProcessRegistration": "_process",
    "backfill_node": "_process",
    "default_node": "_process",
    "process_alive": "_process",
    "SourceAllowList": "_receiver",
    "create_receiver_app": "_receiver",
    "new_secret_path": "_receiver",
    "validate_cdr": "_receiver",
    "ArchiveDirError": "_service",
    "Archiver": "_service",
    "ArchiverConfig": "_service",
    "PbxTarget": "_service",
    "RegistryView": "_service",
    "StartError": "_service",
    "given_pbx_entry": "_service",
    "open_storage": "_service",
    "save_pbx_timezone": "_service",
    "PASSWORD_UNOPENED": "_session",
    "PbxSession": "_session",
    "IndexTokenStore": "_tokens",
    "StorageMismatch": "_where",
    "same_place": "_where",
    "storage_url_for": "_where",
    "Archived": "_workers",
    "WorkerPool": "_workers",
}

__getattr__ = lazy_exports(__name__, _HOMES)


__all__ = [
    "DEFAULT_PATIENCE_S",
    "NODE_KIND",
    "PASSWORD_UNOPENED",
    "AlertSettings",
    "Alerter",
    "ArchiveDirError",
    "Archived",
    "Archiver",
    "ArchiverConfig",
    "ArchiverMetrics",
    "BackfillStats",
    "Decision",
    "Downloads",
    "DrainResult",
    "Fenced",
    "GroupCommitter",
    "IndexTokenStore",
    "Notice",
    "PbxSession",
    "PbxTarget",
    "PoolOptions",
    "ProcessRegistration",
    "RegistryView",
    "RetryPolicy",
    "ServiceProbe",
    "SourceAllowList",
    "StartError",
    "StorageMismatch",
    "WorkerPool",
    "after_not_found",
    "after_permanent",
    "after_transient",
    "backfill",
    "backfill_node",
    "create_receiver_app",
    "default_node",
    "drain",
    "given_pbx_entry",
    "ingest_window",
    "new_secret_path",
    "open_storage",
    "process_alive",
    "queued_counts",
    "reconcile",
    "same_place",
    "save_pbx_timezone",
    "storage_url_for",
    "validate_cdr",
]
