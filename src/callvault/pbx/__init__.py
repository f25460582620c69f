"""callvault.pbx: a client for the Yeastar S-Series PBX HTTP API.

    async with PbxClient("https://127.0.0.1:8088", "api", password,
                         tls=TlsOptions(pin_sha256=fingerprint)) as pbx:
        result = await pbx.download_recording(name, Path("recordings"))

Also: `SyncPbxClient` (blocking), `parse_event` for pushed reports, `parse_cdr_csv` for the
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
    AllowedIpError,
    AuthError,
    CdrError,
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
    RecordingNotFound,
    RequestRejected,
    SessionWithdrawn,
    TokenError,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
    UnsafeRecordingName,
    error_for_errno,
    error_kind,
    is_transient,
)
from callvault.pbx._events import parse_event
from callvault.pbx._tls import (
    TlsOptions,
    build_ssl_context,
    certificate_sha256,
    normalise_pin,
)
from callvault.pbx._types import (
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
    from callvault.pbx._sync import SyncPbxClient

# Exported names whose modules are imported on first use (they need httpx).
_LAZY = {
    "PbxClient": "_client",
    "ProgressCallback": "_client",
    "check_recording_name": "_client",
    "password_md5": "_client",
    "SyncPbxClient": "_sync",
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "CSV_COLUMNS",
    "ERRNO_TABLE",
    "AllowedIpError",
    "ApiVersion",
    "AuthError",
    "BootUpEvent",
    "CallDetail",
    "CdrError",
    "DownloadResult",
    "ErrorKind",
    "Event",
    "EventFormat",
    "EventParseError",
    "InvalidRecording",
    "LoginFailed",
    "LoginLockedOut",
    "NewCdrEvent",
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
    "RecordingNotFound",
    "RequestRejected",
    "SessionWithdrawn",
    "StreamTransform",
    "SyncPbxClient",
    "TlsOptions",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "TokenMissing",
    "UnsafeRecordingName",
    "build_ssl_context",
    "call_detail_from_fields",
    "call_detail_row",
    "certificate_sha256",
    "check_pbx_url",
    "check_recording_name",
    "error_for_errno",
    "error_kind",
    "is_transient",
    "normalise_pin",
    "normalise_status",
    "parse_cdr_csv",
    "parse_event",
    "parse_seconds",
    "password_md5",
]
