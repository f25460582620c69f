"""The one exception tree of callvault.pbx, and what trying again can do about each error.

    PbxError                      anything the PBX or the way to it did wrong      kind
    ├── PbxTransportError         could not talk to the PBX (refused, reset,       transient
    │   │                         timeout, 5xx, HTML)
    │   ├── PbxUnreachable        no connection at all (refused, no route, DNS,    transient
    │   │                         connect timeout)
    │   └── PbxTlsError           certificate not trusted, pin mismatch, TLS       transient
    │                             handshake failed
    ├── PbxProtocolError          the PBX answered something that is not the API   transient
    │   │                         (bad JSON, HTTP spoken to a TLS port, ...)
    │   ├── InvalidRecording      download body is not audio / shorter than        transient
    │   │                         announced
    │   └── EventParseError       a pushed report that is not a PBX event          permanent
    ├── UnsafeRecordingName       a name that cannot be a file name (refused       permanent
    │                             before any request)
    ├── SessionWithdrawn          the client's owner withdrew it (its node lost    transient
    │                             the PBX's lease); nothing was sent
    └── PbxApiError               the API said "Failed" with an errno (HTTP 200)   permanent
        ├── AuthError
        │   ├── LoginFailed       20003 wrong username or password                 login-refused
        │   ├── LoginLockedOut    20002 five failed logins: IP locked for ten      login-refused
        │   │                     minutes
        │   └── TokenError        20004 / 20005 / 20006 (re-login once, repeat     transient
        │       │                 once)
        │       ├── TokenInvalid  20004
        │       ├── TokenMissing  20005
        │       └── TokenExpired  20006
        ├── RandomInvalid         20012 (later firmware), 20017, 20020             transient
        ├── RecordingNotFound     20014, 20018 (and 20012 on 2017 firmware, see    not-found
        │                         below)
        ├── AllowedIpError        20015                                            transient
        ├── CdrError              20019 / 20021                                    permanent
        ├── PbxBusy               20010 / 30001 / 30003: the PBX's API service is  transient
        │                         struggling
        └── RequestRejected       every other errno                                permanent

    PinMismatchError              raised inside the TLS handshake (an ssl error, not a
                                  PbxError); the client reports it as PbxTlsError

Every PbxError has a `kind` (an `ErrorKind`), which says what trying again later can do:

- TRANSIENT: a later attempt may succeed (the network, a busy PBX, a bad body, a
  certificate or an allowed IP that an operator may still fix): back off and try again.
- NOT_FOUND: the PBX has no such recording, yet or any more: try again on a not-found
  schedule (a recording is written a little after its call ends) and give up as missing.
- LOGIN_REFUSED: the PBX refused the login (wrong password, lockout, or refused for any
  other reason, which the client marks so): pause every call, never loop; the client itself
  sends no login for a while, so five refusals cannot lock this IP out.
- PERMANENT: the request can never succeed as asked (an unsafe name, a request the API
  rejects, a malformed event): fail at once with the reason.

`exc.transient` is True for every kind but PERMANENT: nothing about the job itself has to
change for a later attempt to succeed. `error_kind` and `is_transient` classify any
exception, PbxError or not (a full disk is transient, a ValueError from bad input
permanent). Apart from that, the client retries some transient failures at once, within
one call (`retried_at_once`): transport failures other than a refused certificate,
RandomInvalid, InvalidRecording and PbxBusy.

The meaning of 20012 changed between firmware generations (2017: "file does not exist";
later: "random string invalid"). We map it to RandomInvalid; the client fetches a fresh
random and tries again, and after a bounded number of identical answers raises
RecordingNotFound. The errno is always kept as the PBX sent it: a string.

Messages never contain the password, a token or a random.
"""

from __future__ import annotations

import enum
import errno as errnos
import ssl


class ErrorKind(enum.Enum):
    """What trying again later can do about a failure (see the module doc)."""

    TRANSIENT = "transient"
    """A later attempt may succeed: back off and try again."""
    NOT_FOUND = "not-found"
    """The PBX has no such recording, yet or any more: the not-found schedule."""
    LOGIN_REFUSED = "login-refused"
    """The PBX refused the login: pause everything, never loop."""
    PERMANENT = "permanent"
    """Can never succeed as asked: fail at once with the reason."""


class PbxError(Exception):
    """Something went wrong talking to the PBX.

    `kind` is the class's `ErrorKind`; an instance may carry another one where the context
    decides (the client marks any refused login LOGIN_REFUSED).
    """

    errno: str | None = None
    kind: ErrorKind = ErrorKind.TRANSIENT

    def __init__(self, message: str, *, errno: str | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def transient(self) -> bool:
        """Whether a later attempt may succeed without anything about the job changing."""
        return self.kind is not ErrorKind.PERMANENT


class PbxTransportError(PbxError):
    """The PBX could not be reached or the connection failed (retryable)."""


class PbxUnreachable(PbxTransportError):
    """No connection to the PBX could be made (refused, no route, name unknown, timed out)."""


class PbxTlsError(PbxTransportError):
    """The TLS handshake failed or the PBX's certificate is not the trusted one."""


class SessionWithdrawn(PbxError):
    """The client may not talk to the PBX now: its owner withdrew it (in the archiver, the
    node lost the PBX to another node). Nothing was sent; whoever holds the PBX now goes on."""


class PbxProtocolError(PbxError):
    """The PBX answered with something that is not the documented API response."""


class InvalidRecording(PbxProtocolError):
    """A download body was not a complete audio file."""


class EventParseError(PbxProtocolError, ValueError):
    """A pushed report that is not a JSON object with an ``action`` or ``event`` name."""

    kind = ErrorKind.PERMANENT  # the same bytes will never parse


class UnsafeRecordingName(PbxError, ValueError):
    """A recording (or file) name that cannot safely be a file name; refused before any
    request, so it can never succeed (a ValueError too, as it was before it had a class)."""

    kind = ErrorKind.PERMANENT


class PbxApiError(PbxError):
    """The API answered status Failed with an errno (sent with HTTP 200)."""

    kind = ErrorKind.PERMANENT


class AuthError(PbxApiError):
    """Login or token problem."""


class LoginFailed(AuthError):
    """Wrong API username or password (errno 20003). Never retried automatically."""

    kind = ErrorKind.LOGIN_REFUSED


class LoginLockedOut(AuthError):
    """The PBX has locked this IP out after five failed logins (errno 20002), for ten minutes."""

    kind = ErrorKind.LOGIN_REFUSED


class TokenError(AuthError):
    """The token was rejected; the client logs in again once and repeats the call once."""

    kind = ErrorKind.TRANSIENT


class TokenInvalid(TokenError):
    """The PBX does not know this token (errno 20004)."""


class TokenMissing(TokenError):
    """The request carried no token (errno 20005)."""


class TokenExpired(TokenError):
    """The token timed out (errno 20006)."""


class RandomInvalid(PbxApiError):
    """The one-time download random was unknown, expired or already used."""

    kind = ErrorKind.TRANSIENT


class RecordingNotFound(PbxApiError):
    """The PBX has no recording of that name (deleted, cleaned up, or not written yet)."""

    kind = ErrorKind.NOT_FOUND


class AllowedIpError(PbxApiError):
    """The PBX refused the download from this IP (allowedip, errno 20015)."""

    kind = ErrorKind.TRANSIENT  # a setting of the PBX or of ours, which may be fixed


class CdrError(PbxApiError):
    """The CDR export failed: bad time format or no CDR in the range."""


class PbxBusy(PbxApiError):
    """The PBX's API service failed to handle the request (20010, 30001, 30003): retryable."""

    kind = ErrorKind.TRANSIENT


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


class PinMismatchError(ssl.SSLCertVerificationError):
    """The server's certificate does not have the pinned SHA-256 fingerprint.

    Raised inside the TLS handshake, so that not one byte of a request reaches the wrong
    server; the client reports it as a `PbxTlsError`.
    """


# ------------------------------------------------------------ classification

# Exceptions that are not PbxErrors, by class, most specific first. OSError covers the disk
# (full, read-only, permissions an operator may fix) and the network; a name the file
# system refuses is the exception. The rest means the input can never work.
_NAME_REFUSED_ERRNOS = frozenset({errnos.ENAMETOOLONG, errnos.EILSEQ})
_PERMANENT_CLASSES: tuple[type[BaseException], ...] = (
    ValueError,  # bad input, UnicodeError included
    TypeError,
    LookupError,
    ArithmeticError,  # OverflowError: a date or a number out of range
    NotImplementedError,
)


def error_kind(exc: BaseException) -> ErrorKind:
    """What trying again later can do about `exc`, whatever it is.

    A PbxError says so itself (`exc.kind`). For other exceptions: an OSError is transient
    unless the file system refused the name (ENAMETOOLONG, EILSEQ); ValueError, TypeError,
    LookupError, ArithmeticError and NotImplementedError are permanent (bad input); an
    exception group is what all its members are, or transient if they disagree; anything
    else (a cancellation, an unexpected failure) is transient, so a bounded retry policy
    decides.
    """
    if isinstance(exc, PbxError):
        return exc.kind
    if isinstance(exc, OSError):
        if exc.errno in _NAME_REFUSED_ERRNOS:
            return ErrorKind.PERMANENT
        return ErrorKind.TRANSIENT
    if isinstance(exc, BaseExceptionGroup):
        kinds = {error_kind(member) for member in exc.exceptions}
        return kinds.pop() if len(kinds) == 1 else ErrorKind.TRANSIENT
    if isinstance(exc, _PERMANENT_CLASSES):
        return ErrorKind.PERMANENT
    return ErrorKind.TRANSIENT


def is_transient(exc: BaseException) -> bool:
    """Whether a later attempt may succeed: False only for failures that can never succeed
    as asked (`ErrorKind.PERMANENT`), which should fail a job at once with the reason."""
    return error_kind(exc) is not ErrorKind.PERMANENT


def retried_at_once(error: PbxError) -> bool:
    """Whether the client retries `error` itself, within the call, with backoff.

    Transport failures other than a refused certificate (a certificate does not fix itself
    in seconds), a body that is neither the audio nor a JSON error (InvalidRecording: a
    transport failure, spec section 9, gotcha 5), an invalid random and a busy PBX.
    """
    if isinstance(error, PbxTlsError):
        return False
    return isinstance(error, PbxTransportError | RandomInvalid | InvalidRecording | PbxBusy)
