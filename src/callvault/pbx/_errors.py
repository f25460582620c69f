"""The one exception tree of callvault.pbx.

    PbxError                      anything the PBX or the way to it did wrong
    ├── PbxTransportError         could not talk to the PBX (refused, reset, timeout, 5xx, HTML)
    │   ├── PbxUnreachable        no connection at all (refused, no route, DNS, connect timeout)
    │   └── PbxTlsError           certificate not trusted, pin mismatch, TLS handshake failed
    ├── PbxProtocolError          the PBX answered something that is not the API (bad JSON,...)
    │   └── InvalidRecording      download body is not audio / shorter than announced
    └── PbxApiError               the API said "Failed" with an errno (HTTP 200)
        ├── AuthError
        │   ├── LoginFailed       20003 wrong username or password (never retried)
        │   ├── LoginLockedOut    20002 five failed logins: IP locked for ten minutes
        │   └── TokenError        20004 / 20005 / 20006 (re-login once, repeat once)
        │       ├── TokenInvalid  20004
        │       ├── TokenMissing  20005
        │       └── TokenExpired  20006
        ├── RandomInvalid         20012 (later firmware), 20017, 20020
        ├── RecordingNotFound     20014 (and 20012 on 2017 firmware, see below)
        ├── AllowedIpError        20015
        ├── CdrError              20019 / 20021
        ├── PbxBusy               20010 / 30001 / 30003: the PBX's API service is struggling
        └── RequestRejected       every other errno

The meaning of 20012 changed between firmware generations (2017: "file does not exist";
later: "random string invalid"). We map it to RandomInvalid; the client fetches a fresh
random and tries again, and after a bounded number of identical answers treats it as not
found. The errno is always kept as the PBX sent it: a string.

Messages never contain the password, a token or a random.
"""

from __future__ import annotations


class PbxError(Exception):
    """Something went wrong talking to the PBX."""

    errno: str | None = None

    def __init__(self, message: str, *, errno: str | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return self.message


class PbxTransportError(PbxError):
    """The PBX could not be reached or the connection failed (retryable)."""


class PbxUnreachable(PbxTransportError):
    """No connection to the PBX could be made (refused, no route, name unknown, timed out)."""


class PbxTlsError(PbxTransportError):
    """The TLS handshake failed or the PBX's certificate is not the trusted one."""


class PbxProtocolError(PbxError):
    """The PBX answered with something that is not the documented API response."""


class InvalidRecording(PbxProtocolError):
    """A download body was not a complete audio file."""


class PbxApiError(PbxError):
    """The API answered status Failed with an errno (sent with HTTP 200)."""


class AuthError(PbxApiError):
    """Login or token problem."""


class LoginFailed(AuthError):
    """Wrong API username or password (errno 20003). Never retried automatically."""


class LoginLockedOut(AuthError):
    """The PBX has locked this IP out after five failed logins (errno 20002), for ten minutes."""


class TokenError(AuthError):
    """The token was rejected; the client logs in again once and repeats the call once."""


class TokenInvalid(TokenError):
    """The PBX does not know this token (errno 20004)."""


class TokenMissing(TokenError):
    """The request carried no token (errno 20005)."""


class TokenExpired(TokenError):
    """The token timed out (errno 20006)."""


class RandomInvalid(PbxApiError):
    """The one-time download random was unknown, expired or already used."""


class RecordingNotFound(PbxApiError):
    """The PBX has no recording of that name (deleted, cleaned up, or not written yet)."""


class AllowedIpError(PbxApiError):
    """The PBX refused the download from this IP (allowedip, errno 20015)."""


class CdrError(PbxApiError):
    """The CDR export failed: bad time format or no CDR in the range."""


class PbxBusy(PbxApiError):
    """The PBX's API service failed to handle the request (20010, 30001, 30003): retryable."""


class RequestRejected(PbxApiError):
    """Any other API error."""


# errno -> (class, what it means in words). The one place errnos are interpreted.
ERRNO_TABLE: dict[str, tuple[type[PbxApiError], str]] = {
    "10002": (RequestRejected, "unsupported XML data packet format"),
    "10003": (RequestRejected, "unsupported API request"),
    "10004": (RequestRejected, "a required parameter is blank"),
    "20000": (RequestRejected, "the PBX only accepts JSON"),
    "20001": (RequestRejected, "the PBX only accepts POST for this request"),
    "20002": (LoginLockedOut, "login locked out after five failed attempts; wait ten minutes"),
    "20003": (LoginFailed, "wrong API username or password"),
    "20004": (TokenInvalid, "the PBX does not know the token"),
    "20005": (TokenMissing, "the token is blank"),
    "20006": (TokenExpired, "the token timed out"),
    "20007": (RequestRejected, "the request body is blank"),
    "20008": (RequestRejected, "wrong port"),
    "20009": (RequestRejected, "blank request"),
    "20010": (PbxBusy, "the PBX failed to pass the request to its API service"),
    "20011": (RequestRejected, "heartbeat configuration failed"),
    "20012": (RandomInvalid, "the download random is invalid or expired"),
    "20013": (RequestRejected, "wrong captcha"),
    "20014": (RecordingNotFound, "recording not found on the PBX"),
    "20015": (AllowedIpError, "this IP is not allowed to download (allowedip)"),
    "20016": (RequestRejected, "voicemail status parameter wrong"),
    "20017": (RandomInvalid, "the voicemail random is invalid"),
    "20018": (RecordingNotFound, "voice file does not exist"),
    "20019": (CdrError, "CDR time format error"),
    "20020": (RandomInvalid, "the CDR random is invalid or expired"),
    "20021": (CdrError, "no CDR in that range"),
    "30001": (PbxBusy, "the PBX ran out of memory building JSON"),
    "30003": (PbxBusy, "the PBX's API service is not running"),
}


def error_for_errno(errno: str, context: str = "") -> PbxApiError:
    """Build the exception for an errno; `context` says what was being done (no secrets)."""
    cls, words = ERRNO_TABLE.get(errno, (RequestRejected, "the PBX rejected the request"))
    message = f"{words}, errno {errno}"
    if context:
        message = f"{context}: {message}"
    return cls(message, errno=errno)
