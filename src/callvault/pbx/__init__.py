"""callvault.pbx: clients for the Yeastar S-Series PBX HTTP API and the P-Series OpenAPI.

    async with PbxClient("https://127.0.0.1:8088", "api", password,
                         tls=TlsOptions(pin_sha256=fingerprint)) as pbx:
        result = await pbx.download_recording(name, Path("recordings"))

`PSeriesClient` speaks the P-Series OpenAPI behind the same methods (login, heartbeat,
logout, download_recording, export_cdr_range), plus `events` over its WebSocket; its tokens
live in a `TokenStore`. `parse_pseries_event` and `verify_webhook_signature` serve a
webhook receiver without the HTTP stack.

Also: `tcp_reports` (the S-Series v2 reports over its TCP report port, "Report Method =
TCP"), `SyncPbxClient` (blocking), `parse_event` for pushed reports, `parse_cdr_csv` for the
CDR export, and the one exception tree rooted at `PbxError`, each error with its
`ErrorKind` (transient, not found, login refused, permanent); `error_kind` and
`is_transient` classify any exception.

The client itself (`PbxClient`, `SyncPbxClient`, and the helpers in their modules) is
imported when first used: the data types, errors and parsers cost no HTTP stack, so code
that only reads events or settings (the receiver, `callvault list`) starts quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from callvault._lazy import lazy_exports
from callvault.pbx._cdr import (
    CSV_COLUMNS,
    call_detail_from_fields,
    call_detail_row,
    parse_cdr_csv,
    parse_seconds,
)
from callvault.pbx._errors import (
    ERRNO_TABLE,
    PSERIES_ERRCODE_TABLE,
    AllowedIpError,
    ApiConfigError,
    ApiIpForbidden,
    ApiPermissionDenied,
    AuthError,
    CdrError,
    DownloadProcessing,
    ErrorKind,
    EventParseError,
    InvalidRecording,
    LoginFailed,
    LoginLockedOut,
    PbxApiError,
    PbxBusy,
    PbxError,
    PbxProtocolError,
    PbxTlsError,
    PbxTransportError,
    PbxUnreachable,
    PinMismatchError,
    RandomInvalid,
    RecordingIdMismatch,
    RecordingNotFound,
    RequestRejected,
    SessionWithdrawn,
    TokenBudgetFull,
    TokenError,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
    UnsafeRecordingName,
    error_for_errcode,
    error_for_errno,
    error_kind,
    is_transient,
)
from callvault.pbx._events import parse_event
from callvault.pbx._pseries_events import (
    EventsResumed,
    parse_pseries_event,
    pseries_call_detail,
    verify_webhook_signature,
    webhook_signature,
)
from callvault.pbx._pseries_tokens import (
    MemoryTokenStore,
    TokenSet,
    TokenStore,
    shared_memory_store,
)
from callvault.pbx._tls import (
    TlsOptions,
    build_ssl_context,
    certificate_sha256,
    normalise_pin,
)
from callvault.pbx._types import (
    PBX_KINDS,
    ApiVersion,
    BootUpEvent,
    CallDetail,
    DownloadResult,
    Event,
    EventFormat,
    NewCdrEvent,
    StreamTransform,
    normalise_status,
)
from callvault.pbx._urls import check_pbx_url

if TYPE_CHECKING:
    from callvault.pbx._client import (
        PbxClient,
        ProgressCallback,
        check_recording_name,
        password_md5,
    )
    from callvault.pbx._pseries import PSeriesClient
    from callvault.pbx._sync import SyncPbxClient
    from callvault.pbx._tcp_reports import tcp_reports

# Exported names whose modules are imported on first use (they need httpx).
_LAZY = {
    "PbxClient": "_client",
    "ProgressCallback": "_client",
    "check_recording_name": "_client",
    "password_md5": "_client",
    "SyncPbxClient": "_sync",
    "PSeriesClient": "_pseries",
    "tcp_reports": "_tcp_reports",
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "CSV_COLUMNS",
    "ERRNO_TABLE",
    "PBX_KINDS",
    "PSERIES_ERRCODE_TABLE",
    "AllowedIpError",
    "ApiConfigError",
    "ApiIpForbidden",
    "ApiPermissionDenied",
    "ApiVersion",
    "AuthError",
    "BootUpEvent",
    "CallDetail",
    "CdrError",
    "DownloadProcessing",
    "DownloadResult",
    "ErrorKind",
    "Event",
    "EventFormat",
    "EventParseError",
    "EventsResumed",
    "InvalidRecording",
    "LoginFailed",
    "LoginLockedOut",
    "MemoryTokenStore",
    "NewCdrEvent",
    "PSeriesClient",
    "PbxApiError",
    "PbxBusy",
    "PbxClient",
    "PbxError",
    "PbxProtocolError",
    "PbxTlsError",
    "PbxTransportError",
    "PbxUnreachable",
    "PinMismatchError",
    "ProgressCallback",
    "RandomInvalid",
    "RecordingIdMismatch",
    "RecordingNotFound",
    "RequestRejected",
    "SessionWithdrawn",
    "StreamTransform",
    "SyncPbxClient",
    "TlsOptions",
    "TokenBudgetFull",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "TokenMissing",
    "TokenSet",
    "TokenStore",
    "UnsafeRecordingName",
    "build_ssl_context",
    "call_detail_from_fields",
    "call_detail_row",
    "certificate_sha256",
    "check_pbx_url",
    "check_recording_name",
    "error_for_errcode",
    "error_for_errno",
    "error_kind",
    "is_transient",
    "normalise_pin",
    "normalise_status",
    "parse_cdr_csv",
    "parse_event",
    "parse_pseries_event",
    "parse_seconds",
    "password_md5",
    "pseries_call_detail",
    "shared_memory_store",
    "tcp_reports",
    "verify_webhook_signature",
    "webhook_signature",
]
