"""The exception tree of callvault.pbx: its kinds, the classification of any exception, the
one error mapper, and the errno table.

Pure functions, no network; the mapper's answers to real sockets and real TLS handshakes
are tested where they happen (test_pbx_download.py, test_pbx_tls.py, test_pbx_session.py).
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import inspect
import ssl
from pathlib import Path

import httpx
import pytest

import callvault.pbx
from callvault.pbx import (
    ERRNO_TABLE,
    AllowedIpError,
    CdrError,
    ErrorKind,
    EventParseError,
    InvalidRecording,
    LoginFailed,
    LoginLockedOut,
    PbxApiError,
    PbxBusy,
    PbxClient,
    PbxError,
    PbxProtocolError,
    PbxTlsError,
    PbxTransportError,
    PbxUnreachable,
    PinMismatchError,
    RandomInvalid,
    RecordingNotFound,
    RequestRejected,
    TlsOptions,
    TokenExpired,
    UnsafeRecordingName,
    check_recording_name,
    error_for_errno,
    error_kind,
    is_transient,
)
from callvault.pbx._mapping import Phase, transport_error
from support.pbx_fakes import PASSWORD, FakePbx, Sleeps, serve_fake_pbx

T, N, L, P = (
    ErrorKind.TRANSIENT,
    ErrorKind.NOT_FOUND,
    ErrorKind.LOGIN_REFUSED,
    ErrorKind.PERMANENT,
)

CLASSIFICATION: list[tuple[BaseException, ErrorKind]] = [
    # PbxErrors say it themselves.
    (PbxTransportError("reset"), T),
    (PbxUnreachable("refused"), T),
    (PbxTlsError("certificate not trusted"), T),
    (PbxProtocolError("not the API"), T),
    (InvalidRecording("not a WAV file"), T),
    (error_for_errno("20010"), T),  # PbxBusy
    (error_for_errno("30003"), T),  # PbxBusy
    (error_for_errno("20012"), T),  # RandomInvalid
    (error_for_errno("20006"), T),  # TokenExpired, after the client's one re-login
    (error_for_errno("20015"), T),  # AllowedIpError: a setting that may be fixed
    (error_for_errno("20014"), N),  # RecordingNotFound
    (error_for_errno("20018"), N),
    (error_for_errno("20003"), L),  # LoginFailed
    (error_for_errno("20002"), L),  # LoginLockedOut
    (error_for_errno("20019"), P),  # CdrError: the time format
    (error_for_errno("10004"), P),  # RequestRejected
    (error_for_errno("99999"), P),  # an errno nobody knows
    (UnsafeRecordingName("recording name '..' is not a file name"), P),
    (EventParseError("report is not JSON"), P),
    # Anything else, by its class.
    (OSError(errno.ENOSPC, "No space left on device"), T),
    (OSError(errno.EIO, "Input/output error"), T),
    (PermissionError(errno.EACCES, "Permission denied"), T),
    (TimeoutError(), T),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), T),
    (OSError(errno.ENAMETOOLONG, "File name too long"), P),
    (OSError(errno.EILSEQ, "Invalid or incomplete multibyte or wide character"), P),
    (httpx.ReadError("connection reset"), T),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), T),
    (ValueError("not a time"), P),
    (UnicodeEncodeError("ascii", "Müller", 1, 2, "ordinal not in range(128)"), P),
    (OverflowError("date value out of range"), P),
    (TypeError("expected str"), P),
    (KeyError("callid"), P),
    (NotImplementedError(), P),
    (RuntimeError("something unexpected"), T),
    (asyncio.CancelledError(), T),
    (ExceptionGroup("all bad input", [ValueError("a"), KeyError("b")]), P),
    (ExceptionGroup("mixed", [ValueError("a"), OSError(errno.ENOSPC, "full")]), T),
]


@pytest.mark.parametrize(("exc", "kind"), CLASSIFICATION, ids=lambda v: repr(v)[:60])
def test_classification(exc: BaseException, kind: ErrorKind) -> None:
    assert error_kind(exc) is kind
    assert is_transient(exc) is (kind is not ErrorKind.PERMANENT)
    if isinstance(exc, PbxError):
        assert exc.kind is kind
        assert exc.transient is is_transient(exc)


def pbx_error_classes() -> list[type[PbxError]]:
    return [
        obj
        for obj in vars(callvault.pbx).values()
        if inspect.isclass(obj) and issubclass(obj, PbxError)
    ]


def test_every_exported_exception_lives_in_the_errors_module() -> None:
    exported = [
        obj
        for name in callvault.pbx.__all__
        if inspect.isclass(obj := getattr(callvault.pbx, name)) and issubclass(obj, BaseException)
    ]
    assert PinMismatchError in exported and EventParseError in exported
    assert {cls.__module__ for cls in exported} == {"callvault.pbx._errors"}


def test_the_tree_in_the_module_doc_gives_each_class_its_kind() -> None:
    """A kind at the end of a class's line is its kind; a line without one inherits it."""
    doc = inspect.getdoc(callvault.pbx._errors) or ""
    kinds = {kind.value for kind in ErrorKind}
    for cls in pbx_error_classes():
        if cls is PbxError:
            continue
        tree = [line for line in doc.splitlines() if "── " in line]
        [line] = [line for line in tree if f"── {cls.__name__} " in f"{line} "]
        words = line.split()
        if words[-1] in kinds:
            assert words[-1] == cls.kind.value, line
        else:
            assert cls.kind is cls.__mro__[1].kind, line


def test_every_errno_maps_to_a_class_of_the_tree() -> None:
    for number, (cls, words) in ERRNO_TABLE.items():
        error = error_for_errno(number, "login")
        assert type(error) is cls and error.errno == number
        assert str(error) == f"login: {words}, errno {number}"
    assert isinstance(error_for_errno("12345"), RequestRejected)
    assert {type(error_for_errno(e)) for e in ("20002", "20003")} == {LoginLockedOut, LoginFailed}
    assert all(
        issubclass(cls, PbxApiError)
        for cls in (AllowedIpError, CdrError, PbxBusy, RandomInvalid, RecordingNotFound)
    )
    assert issubclass(TokenExpired, PbxApiError)


# ------------------------------------------------------------ unsafe names


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "a/b.wav",
        "a\\b.wav",
        ".",
        "..",
        "",
        "a\x00.wav",
        "a\nb.wav",
        "a\x1b[2Jb.wav",
        "a\x7f.wav",
        "\udc80.wav",  # not text: a lone surrogate
        "x" * 252 + ".wav",
    ],
)
async def test_an_unsafe_name_is_a_permanent_pbx_error_raised_before_any_request(
    name: str, tmp_path: Path
) -> None:
    with pytest.raises(UnsafeRecordingName) as info:
        check_recording_name(name)
    assert isinstance(info.value, ValueError)  # what it was before it had a class
    assert not is_transient(info.value) and info.value.kind is ErrorKind.PERMANENT
    pbx = FakePbx()
    with serve_fake_pbx(pbx) as base:
        async with PbxClient(base, "api", PASSWORD, sleep=Sleeps()) as client:
            with pytest.raises(UnsafeRecordingName):
                await client.download_recording(name, tmp_path)
            with pytest.raises(UnsafeRecordingName, match="file name"):
                await client.download_recording("a.wav", tmp_path, filename=name or ".")
    assert pbx.calls == []


@pytest.mark.parametrize(
    "name",
    [
        "20240101120000-1704110400.1-+4915112345678-1000-Inbound.wav",
        "Müller-1001.wav",
        "with space.wav",
        "x" * 251 + ".wav",
    ],
)
def test_odd_but_safe_names_pass(name: str) -> None:
    assert check_recording_name(name) == name


# ------------------------------------------------------------ the mapper

ORIGIN = "127.0.0.1:8088"
CONTEXT = "recording a.wav"
BROKE_OFF = "recording a.wav: the connection to the PBX broke off"
HANDSHAKE_CUT = "recording a.wav: the connection to the PBX broke off during the TLS handshake"
NO_ANSWER = "recording a.wav: the PBX did not answer in time"
TIMED_OUT = "cannot reach the PBX at 127.0.0.1:8088: connection timed out"
CHECK = " (check the URL's host and port, and that this host may connect to it)"

MAPPED: list[tuple[BaseException, Phase, type[PbxError], str]] = [
    # httpx says its phase itself.
    (
        httpx.ConnectError("[Errno 111] Connection refused"),
        "exchange",
        PbxUnreachable,
        "cannot reach the PBX at 127.0.0.1:8088: [Errno 111] Connection refused" + CHECK,
    ),
    (
        httpx.ConnectError("failed for /api/x?token=tok123&random=rnd456"),
        "exchange",
        PbxUnreachable,
        "cannot reach the PBX at 127.0.0.1:8088: failed for /api/x" + CHECK,
    ),
    (httpx.ConnectTimeout("timed out"), "exchange", PbxUnreachable, TIMED_OUT),
    (httpx.ReadTimeout("timed out"), "exchange", PbxTransportError, NO_ANSWER),
    (httpx.RemoteProtocolError("Server disconnected"), "exchange", PbxTransportError, BROKE_OFF),
    (httpx.ReadError("reset"), "exchange", PbxTransportError, BROKE_OFF),
    (httpx.WriteError("broken pipe"), "exchange", PbxTransportError, BROKE_OFF),
    (
        httpx.UnsupportedProtocol("no"),
        "exchange",
        PbxTransportError,
        "recording a.wav: talking to the PBX failed (UnsupportedProtocol)",
    ),
    # A plain socket, per phase.
    (
        ConnectionRefusedError(111, "Connection refused"),
        "connect",
        PbxUnreachable,
        "cannot reach the PBX at 127.0.0.1:8088: [Errno 111] Connection refused" + CHECK,
    ),
    (TimeoutError(), "connect", PbxUnreachable, TIMED_OUT),
    (TimeoutError(), "handshake", PbxUnreachable, TIMED_OUT),
    (ssl.SSLEOFError(8, "EOF"), "handshake", PbxTransportError, HANDSHAKE_CUT),
    (ConnectionResetError(104, "reset"), "handshake", PbxTransportError, HANDSHAKE_CUT),
    (TimeoutError(), "exchange", PbxTransportError, NO_ANSWER),
    (ConnectionResetError(104, "reset"), "exchange", PbxTransportError, BROKE_OFF),
    (ssl.SSLEOFError(8, "EOF"), "exchange", PbxTransportError, BROKE_OFF),
    (http.client.IncompleteRead(b"x", 10), "exchange", PbxTransportError, BROKE_OFF),
    (ValueError("I/O operation on closed file"), "exchange", PbxTransportError, BROKE_OFF),
]


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


MAPPED += [
    # What httpx raises when a TLS handshake meets an EOF or a reset (found in the chain).
    (
        chained(httpx.ConnectError(""), ssl.SSLEOFError(8, "UNEXPECTED_EOF_WHILE_READING")),
        "exchange",
        PbxTransportError,
        HANDSHAKE_CUT,
    ),
    (
        chained(httpx.ConnectError(""), ConnectionResetError(104, "reset")),
        "exchange",
        PbxTransportError,
        HANDSHAKE_CUT,
    ),
]


@pytest.mark.parametrize(("exc", "phase", "cls", "message"), MAPPED, ids=lambda v: repr(v)[:50])
def test_the_mapper(exc: BaseException, phase: Phase, cls: type[PbxError], message: str) -> None:
    error = transport_error(exc, context=CONTEXT, origin=ORIGIN, tls=TlsOptions(), phase=phase)
    assert type(error) is cls
    assert str(error) == message
    assert error.transient


@pytest.mark.parametrize("phase", ["connect", "handshake"])
def test_the_mapper_on_a_refused_certificate(phase: Phase) -> None:
    pinned = TlsOptions(pin_sha256="ab" * 32)
    mismatch = PinMismatchError("certificate SHA-256 fingerprint does not match the pin")
    error = transport_error(mismatch, context=CONTEXT, origin=ORIGIN, tls=pinned, phase=phase)
    assert type(error) is PbxTlsError
    assert "--pin-sha256" in str(error) and str(error).endswith(f"({ORIGIN})")
    # httpx wraps the handshake's ssl error in a ConnectError: found in the chain.
    try:
        raise httpx.ConnectError("handshake failed") from ssl.SSLCertVerificationError(
            1, "certificate verify failed"
        )
    except httpx.ConnectError as wrapped:
        error = transport_error(wrapped, context=CONTEXT, origin=ORIGIN, tls=TlsOptions())
    assert type(error) is PbxTlsError and "--ca-file or --pin-sha256" in str(error)


# ------------------------------------------------------- kind by context


async def test_a_login_refused_for_any_reason_is_login_refused(tmp_path: Path) -> None:
    """errno 10004 refusing the login is not a fault of the call that needed the login
    (nor permanent for it); refusing a get_random, it is permanent."""
    pbx = FakePbx(login_errno="10004", get_random_errors=["10004"])
    with serve_fake_pbx(pbx) as base:
        async with PbxClient(base, "api", PASSWORD, sleep=Sleeps()) as client:
            with pytest.raises(RequestRejected) as refused:
                await client.login()
            with pytest.raises(RequestRejected) as remembered:
                await client.download_recording("a.wav", tmp_path)
            assert pbx.count("login") == 1  # the second was not sent
            for error in (refused.value, remembered.value):
                assert error.kind is ErrorKind.LOGIN_REFUSED and is_transient(error)
            pbx.login_errno = None
            client.login_failure_pause = 0
            with pytest.raises(RequestRejected) as rejected:
                await client.download_recording("a.wav", tmp_path)
    assert rejected.value.kind is ErrorKind.PERMANENT and not is_transient(rejected.value)
    assert str(rejected.value) == "recording a.wav: a required parameter is blank, errno 10004"
    assert pbx.count("recording/get_random") == 1
