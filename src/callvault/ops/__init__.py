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
    run_retention(archive, now=..., dry_run=...) -> RetentionReport  # retention run, serve
    set_policy / place_hold / delete_now  # callvault retention set, hold add, delete
    find_subject / erase_subject  # callvault subject find|export|erase (GDPR)
    stream_export(rows, storage, key=...) -> ZIP chunks; verify_export(path)  # signed exports
    open_recording / read_recording_range(storage, row, keyring, ...)  # audio, decrypted
    verify_audit(index, now=...) -> AuditVerification  # callvault audit verify, the audit page
    signer / rotate_signing_key / public_keys / write_checkpoint  # callvault keys ...
    rotate_master_keys(index, keyring, now=..., actor=...) -> RotationReport  # keys rotate

The layer sits above the archiver and below the web app and the command line.
"""

from typing import TYPE_CHECKING

from callvault._lazy import lazy_exports

if TYPE_CHECKING:
    from callvault.ops._archive import Archive, ArchiveError, open_archive
    from callvault.ops._audio import (
        RecordingUnreadable,
        open_recording,
        read_head,
        read_recording_range,
        recording_size,
    )
    from callvault.ops._audit import (
        AuditProblem,
        AuditVerification,
        ChainBrokenError,
        PublicKeyView,
        last_verification,
        parse_public_key,
        public_keys,
        record_verification,
        rotate_signing_key,
        signer,
        verify_audit,
        write_checkpoint,
    )
    from callvault.ops._copy import IndexCopyReport, copy_index
    from callvault.ops._exports import (
        ExportError,
        ExportVerification,
        readable_filename,
        safe_filename,
        stream_export,
        verify_export,
    )
    from callvault.ops._health import (
        Check,
        IndexCollector,
        Readiness,
        metrics_registry,
        readiness,
    )
    from callvault.ops._json import JsonResult, json_ready
    from callvault.ops._keys import RotationReport, pending_rotation, rotate_master_keys
    from callvault.ops._pbxs import (
        OPENAPI,
        PbxTest,
        PbxView,
        RefusedRecently,
        add_pbx,
        edit_pbx,
        open_password,
        pbx_client,
        pbx_view,
        remove_pbx,
        require_kept_password,
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
    from callvault.ops._retention import (
        DeleteReport,
        RetentionReport,
        check_rules,
        delete_now,
        draft_policy,
        parse_policy_text,
        place_hold,
        release_hold,
        run_retention,
        set_policy,
    )
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
    from callvault.ops._subjects import (
        SubjectErasure,
        SubjectFindings,
        erase_subject,
        find_subject,
    )
    from callvault.ops._verify import VerifyReport, VerifyResult, verify_archive, verify_recording
    from callvault.ops._words import human_size

# Each name is imported from its module on first use: a command loads only what it runs.
_HOMES = {
    "Archive": "_archive",
    "ArchiveError": "_archive",
    "open_archive": "_archive",
    "RecordingUnreadable": "_audio",
    "open_recording": "_audio",
    "read_head": "_audio",
    "read_recording_range": "_audio",
    "recording_size": "_audio",
    "AuditProblem": "_audit",
    "AuditVerification": "_audit",
    "ChainBrokenError": "_audit",
    "PublicKeyView": "_audit",
    "last_verification": "_audit",
    "parse_public_key": "_audit",
    "public_keys": "_audit",
    "record_verification": "_audit",
    "rotate_signing_key": "_audit",
    "signer": "_audit",
    "verify_audit": "_audit",
    "write_checkpoint": "_audit",
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
    "RotationReport": "_keys",
    "pending_rotation": "_keys",
    "rotate_master_keys": "_keys",
    "OPENAPI": "_pbxs",
    "PbxTest": "_pbxs",
    "PbxView": "_pbxs",
    "RefusedRecently": "_pbxs",
    "add_pbx": "_pbxs",
    "edit_pbx": "_pbxs",
    "open_password": "_pbxs",
    "pbx_client": "_pbxs",
    "pbx_view": "_pbxs",
    "remove_pbx": "_pbxs",
    "require_kept_password": "_pbxs",
    "test_pbx": "_pbxs",
    "tls_options": "_pbxs",
    "DeleteReport": "_retention",
    "RetentionReport": "_retention",
    "check_rules": "_retention",
    "delete_now": "_retention",
    "draft_policy": "_retention",
    "parse_policy_text": "_retention",
    "place_hold": "_retention",
    "release_hold": "_retention",
    "run_retention": "_retention",
    "set_policy": "_retention",
    "SubjectErasure": "_subjects",
    "SubjectFindings": "_subjects",
    "erase_subject": "_subjects",
    "find_subject": "_subjects",
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
    "ExportError": "_exports",
    "ExportVerification": "_exports",
    "readable_filename": "_exports",
    "safe_filename": "_exports",
    "stream_export": "_exports",
    "verify_export": "_exports",
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
    "OPENAPI",
    "REQUEUE_STATES",
    "Archive",
    "ArchiveError",
    "ArchiveStatus",
    "AuditProblem",
    "AuditVerification",
    "ChainBrokenError",
    "Check",
    "DeleteReport",
    "ExportError",
    "ExportVerification",
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
    "PublicKeyView",
    "Readiness",
    "RecordingPage",
    "RecordingUnreadable",
    "RecordingView",
    "RefusedRecently",
    "RequeueResult",
    "RetentionReport",
    "RotationReport",
    "SubjectErasure",
    "SubjectFindings",
    "VerifyReport",
    "VerifyResult",
    "WorkerCount",
    "add_pbx",
    "archive_status",
    "check_rules",
    "copy_index",
    "delete_now",
    "draft_policy",
    "edit_pbx",
    "erase_subject",
    "find_subject",
    "human_size",
    "json_ready",
    "last_verification",
    "metrics_registry",
    "migrate_storage",
    "open_archive",
    "open_password",
    "open_recording",
    "parse_policy_text",
    "parse_public_key",
    "pbx_client",
    "pbx_id_of",
    "pbx_names",
    "pbx_view",
    "pending_rotation",
    "place_hold",
    "public_keys",
    "read_head",
    "read_recording_range",
    "readable_filename",
    "readiness",
    "record_verification",
    "recording_size",
    "release_hold",
    "remove_pbx",
    "requeue",
    "require_kept_password",
    "rotate_master_keys",
    "rotate_signing_key",
    "run_retention",
    "safe_filename",
    "search_recordings",
    "set_policy",
    "signer",
    "stream_export",
    "test_pbx",
    "tls_options",
    "verify_archive",
    "verify_audit",
    "verify_export",
    "verify_recording",
    "write_checkpoint",
]
