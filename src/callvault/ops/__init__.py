"""callvault.ops: the operations the command line and the web app share.

Each is one function over an open `Archive` returning a typed result whose `to_json()` is
what both `--json` and the web API print, so the two never disagree:

    archive = open_archive(directory, db_url)          # ArchiveError: one line
    archive_status(archive, now=...) -> ArchiveStatus  # callvault status, GET /api/status
    verify_archive(archive, now=...) -> VerifyReport   # callvault verify
    verify_recording(archive, row, now=...) -> VerifyResult   # "Verify now", POST .../verify
    requeue(archive, states, now=..., since=...) -> RequeueResult  # callvault requeue
    search_recordings(index, filters, limit=...) -> RecordingPage  # list --json, GET .../recordings
    readiness(index, storage, ...) -> Readiness, metrics_registry(index, ...)  # /readyz, /metrics
    add_pbx / edit_pbx / remove_pbx / test_pbx, pbx_view(record) -> PbxView  # callvault pbx ...
    migrate_storage(archive, target, url, ...) -> MigrationReport  # callvault storage migrate
    copy_index(archive, target, url, ...) -> IndexCopyReport  # callvault index copy

The layer sits above the archiver and below the web app and the command line.
"""

from typing import TYPE_CHECKING

from callvault._lazy import lazy_exports

if TYPE_CHECKING:
    from callvault.ops._archive import Archive, ArchiveError, open_archive
    from callvault.ops._copy import IndexCopyReport, copy_index
    from callvault.ops._health import (
        Check,
        IndexCollector,
        Readiness,
        metrics_registry,
        readiness,
    )
    from callvault.ops._json import JsonResult, json_ready
    from callvault.ops._pbxs import (
        PbxTest,
        PbxView,
        add_pbx,
        edit_pbx,
        open_password,
        pbx_client,
        pbx_view,
        remove_pbx,
        test_pbx,
        tls_options,
    )
    from callvault.ops._recordings import (
        MAX_OFFSET,
        RecordingPage,
        RecordingView,
        pbx_id_of,
        pbx_names,
        search_recordings,
    )
    from callvault.ops._requeue import REQUEUE_STATES, RequeueResult, requeue
    from callvault.ops._status import (
        ArchiveStatus,
        Failure,
        PbxSessionStatus,
        PbxStatus,
        ProcessStatus,
        WorkerCount,
        archive_status,
    )
    from callvault.ops._storage import MigrationFailure, MigrationReport, migrate_storage
    from callvault.ops._verify import VerifyReport, VerifyResult, verify_archive, verify_recording
    from callvault.ops._words import human_size

# Each name is imported from its module on first use: a command loads only what it runs.
_HOMES = {
    "Archive": "_archive",
    "ArchiveError": "_archive",
    "open_archive": "_archive",
    "Check": "_health",
    "IndexCollector": "_health",
    "Readiness": "_health",
    "metrics_registry": "_health",
    "readiness": "_health",
    "JsonResult": "_json",
    "json_ready": "_json",
    "MAX_OFFSET": "_recordings",
    "RecordingPage": "_recordings",
    "RecordingView": "_recordings",
    "search_recordings": "_recordings",
    "pbx_id_of": "_recordings",
    "pbx_names": "_recordings",
    "PbxTest": "_pbxs",
    "PbxView": "_pbxs",
    "add_pbx": "_pbxs",
    "edit_pbx": "_pbxs",
    "open_password": "_pbxs",
    "pbx_client": "_pbxs",
    "pbx_view": "_pbxs",
    "remove_pbx": "_pbxs",
    "test_pbx": "_pbxs",
    "tls_options": "_pbxs",
    "REQUEUE_STATES": "_requeue",
    "RequeueResult": "_requeue",
    "requeue": "_requeue",
    "ArchiveStatus": "_status",
    "Failure": "_status",
    "PbxSessionStatus": "_status",
    "PbxStatus": "_status",
    "ProcessStatus": "_status",
    "WorkerCount": "_status",
    "archive_status": "_status",
    "IndexCopyReport": "_copy",
    "copy_index": "_copy",
    "MigrationFailure": "_storage",
    "MigrationReport": "_storage",
    "migrate_storage": "_storage",
    "VerifyReport": "_verify",
    "VerifyResult": "_verify",
    "verify_archive": "_verify",
    "verify_recording": "_verify",
    "human_size": "_words",
}

__getattr__ = lazy_exports(__name__, _HOMES)


__all__ = [
    "MAX_OFFSET",
    "REQUEUE_STATES",
    "Archive",
    "ArchiveError",
    "ArchiveStatus",
    "Check",
    "Failure",
    "IndexCollector",
    "IndexCopyReport",
    "JsonResult",
    "MigrationFailure",
    "MigrationReport",
    "PbxSessionStatus",
    "PbxStatus",
    "PbxTest",
    "PbxView",
    "ProcessStatus",
    "Readiness",
    "RecordingPage",
    "RecordingView",
    "RequeueResult",
    "VerifyReport",
    "VerifyResult",
    "WorkerCount",
    "add_pbx",
    "archive_status",
    "copy_index",
    "edit_pbx",
    "human_size",
    "json_ready",
    "metrics_registry",
    "migrate_storage",
    "open_archive",
    "open_password",
    "pbx_client",
    "pbx_id_of",
    "pbx_names",
    "pbx_view",
    "readiness",
    "remove_pbx",
    "requeue",
    "search_recordings",
    "test_pbx",
    "tls_options",
    "verify_archive",
    "verify_recording",
]
