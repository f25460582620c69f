"""callvault.pbx: a client for the Yeastar S-Series PBX HTTP API.

    async with PbxClient("https://127.0.0.1:8088", "api", password,
                         tls=TlsOptions(pin_sha256=fingerprint)) as pbx:
        result = await pbx.download_recording(name, Path("recordings"))

Also: `SyncPbxClient` (blocking), `parse_event` for pushed reports, `parse_cdr_csv` for the
CDR export, and the one exception tree rooted at `PbxError`, each error with its
`ErrorKind` (transient, not found, login refused, permanent); `error_kind` and
`is_transient` classify any exception.
"""

from callvault.pbx._cdr import (
    CSV_COLUMNS,
    call_detail_from_fields,
    call_detail_row,
    parse_cdr_csv,
    parse_seconds,
)
from callvault.pbx._client import (
    PbxClient,
    ProgressCallback,
    check_recording_name,
    password_md5,
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
from callvault.pbx._sync import SyncPbxClient
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
    normalise_status,
)

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
