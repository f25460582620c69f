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
    ├── RecordingIdMismatch       P-Series download by id: the id is another       permanent
    │                             file than the name given (nothing written)
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
        │   │                     struggling (P-Series: -2, 70082)
        │   └── DownloadProcessing  P-Series errcode 2: the file is being prepared transient
        ├── ApiConfigError        P-Series: the PBX's API settings refuse us       transient
        │   ├── ApiPermissionDenied  10005: the API app lacks the permission       (not retried
        │   └── ApiIpForbidden       70087: address not in the API IP allow-list   in the call)
        ├── TokenBudgetFull       P-Series 60002 on get_token: every token slot    transient
        │                         of the app is taken (not a login failure)
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

The P-Series OpenAPI answers an integer ``errcode`` (its own numbering, which overlaps the
S-Series errnos: 10004 is "token expired" there); `error_for_errcode` maps it onto the same
tree, keeping it as a string in `.errno`: -1 on get_token -> LoginFailed, 70004 ->
LoginLockedOut, 10004 -> TokenExpired, 60001 on a download -> RecordingNotFound, and the
rows of `PSERIES_ERRCODE_TABLE`.

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


class RecordingIdMismatch(PbxError, ValueError):
    """A download by recording id whose id the PBX says is another file than the name
    given: the id and the name do not belong together, and nothing is written (the same
    request can never succeed; a ValueError too: the caller's arguments disagree)."""

    kind = ErrorKind.PERMANENT


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


class DownloadProcessing(PbxBusy):
    """P-Series errcode 2 PROCESSING: the PBX is still preparing the file (asynchronous
    download mode); asking again later gets its URL."""


class ApiConfigError(PbxApiError):
    """P-Series: the PBX's API settings refuse this client (an operator can fix them).

    Not retried within a call (the same request gets the same answer), but transient for a
    job: once the setting is fixed, the same download succeeds.
    """

    kind = ErrorKind.TRANSIENT


class ApiPermissionDenied(ApiConfigError):
    """P-Series errcode 10005: the API app lacks the permission for this request."""


class ApiIpForbidden(ApiConfigError):
    """P-Series errcode 70087: this address is not in the PBX's API IP allow-list."""


class TokenBudgetFull(PbxApiError):
    """P-Series errcode 60002 on get_token: the API app already holds as many live access
    tokens as the PBX allows (8). Not a login failure: the credentials are right; the
    slots free up as tokens expire (30 minutes at most) or are revoked. The client backs
    off and does not ask again for a while."""

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


# P-Series OpenAPI errcode -> (class, what it means in words). The one place errcodes are
# interpreted; `error_for_errcode` adds what depends on the request (get_token, download).
PSERIES_ERRCODE_TABLE: dict[int, tuple[type[PbxApiError], str]] = {
    -2: (PbxBusy, "internal server error on the PBX"),
    -1: (RequestRejected, "the request failed"),
    1: (RequestRejected, "the request only partially succeeded"),
    2: (DownloadProcessing, "the PBX is still processing the request"),
    10001: (RequestRejected, "the PBX does not have this API endpoint"),
    10002: (RequestRejected, "this API version is no longer maintained by the PBX"),
    10003: (RequestRejected, "this API version is not supported by the PBX"),
    10004: (TokenExpired, "the access token expired or is unknown"),
    10005: (ApiPermissionDenied, "the API app lacks the permission for this request"),
    40001: (RequestRejected, "parameter syntax error"),
    40002: (RequestRejected, "invalid parameter"),
    40003: (RequestRejected, "duplicated value"),
    40004: (RequestRejected, "file size exceeded"),
    60001: (RequestRejected, "data not found"),
    60002: (RequestRejected, "a quantity limit of the PBX is reached"),
    70004: (LoginLockedOut, "the PBX has blocked this IP after failed API authentications"),
    70082: (PbxBusy, "the PBX is running another task of this kind; retry later"),
    70084: (RequestRejected, "action forbidden"),
    70087: (ApiIpForbidden, "this address is not in the PBX's API IP allow-list"),
    70120: (RequestRejected, "the organization is disabled"),
}

_PRINTABLE = frozenset(map(chr, range(0x20, 0x7F)))


def _clean(text: object, limit: int = 80) -> str:
    """A PBX-sent string fit for a one-line message: printable ASCII, bounded."""
    value = "".join(ch for ch in str(text) if ch in _PRINTABLE).strip()
    return value if len(value) <= limit else value[: limit - 3] + "..."


def error_for_errcode(
    errcode: int,
    errmsg: object = "",
    context: str = "",
    *,
    call: str = "",
    fields: tuple[str, ...] = (),
) -> PbxApiError:
    """Build the exception for a P-Series errcode.

    `call` names the request where the meaning depends on it: "get_token" (-1 ->
    LoginFailed, 60002 -> TokenBudgetFull) or "download" (60001 -> RecordingNotFound).
    `errmsg` (as the PBX sent it) and `fields` (the names, never the values, of its
    ``invalid_param_list``) are added to the message. The errcode is kept in `.errno`.
    """
    unknown = (RequestRejected, "the PBX rejected the request")
    cls, words = PSERIES_ERRCODE_TABLE.get(errcode, unknown)
    if call == "get_token" and errcode == -1:
        cls, words = LoginFailed, "the PBX refused the API client ID or secret"
    elif call == "get_token" and errcode == 60002:
        cls = TokenBudgetFull
        words = (
            "the API app's token budget is full (at most 8 live access tokens; this is not a "
            "login failure): wait until one expires (30 minutes at most) or revoke one"
        )
    elif call == "download" and errcode == 60001:
        cls, words = RecordingNotFound, "recording not found on the PBX"
    message = f"{words}, errcode {errcode}"
    detail = _clean(errmsg)
    if detail:
        message += f" {detail}"
    if fields:
        message += " (invalid: " + ", ".join(_clean(name, 40) for name in fields[:5]) + ")"
    if context:
        message = f"{context}: {message}"
    return cls(message, errno=str(errcode))


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
