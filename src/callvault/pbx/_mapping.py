"""The one error mapper: low-level HTTP, TLS and socket failures to `PbxError`s.

Both ways the client talks to the PBX end here: httpx (API calls, the CDR export, and
downloads through an injected transport) and the download's blocking socket (`SocketBody`,
which says which phase failed: the TCP connect, the TLS handshake or the exchange after
it). Messages name the PBX by host and port and never carry a query string (tokens and
randoms live there).

    TLS handshake cut off (EOF, reset)          PbxTransportError  "... broke off during the
                                                                   TLS handshake"
    TLS refused (certificate, pin, version)     PbxTlsError        what to do about it
    connect timed out                           PbxUnreachable     "... connection timed out"
    connect failed (refused, no route, DNS)     PbxUnreachable     the reason
    no answer in time                           PbxTransportError  "... did not answer in time"
    connection broke off, garbled answer        PbxTransportError  "... broke off"
    anything else                               PbxTransportError  "... failed (ErrorClass)"
"""

from __future__ import annotations

import http.client
from typing import Literal

import httpx

from callvault.pbx._errors import PbxError, PbxTlsError, PbxTransportError, PbxUnreachable
from callvault.pbx._tls import (
    TlsOptions,
    describe_tls_failure,
    find_ssl_error,
    is_broken_connection,
)
from callvault.pbx._urls import strip_query

Phase = Literal["connect", "handshake", "exchange"]
"""Where a socket failure happened: the TCP connect, the TLS handshake, or after it."""

_CUT_OFF = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def origin_of(url: httpx.URL) -> str:
    """HOST:PORT of a URL, the port filled in from the scheme: how messages name the PBX."""
    default_port = 443 if url.scheme == "https" else 80
    return f"{url.host}:{url.port or default_port}"


def transport_error(
    exc: BaseException,
    *,
    context: str,
    origin: str,
    tls: TlsOptions,
    phase: Phase = "exchange",
) -> PbxError:
    """The PbxError for a low-level failure `exc` while doing `context` with the PBX at
    `origin`. httpx exceptions say their phase themselves (ConnectError, ConnectTimeout);
    for a plain socket, `phase` says it."""
    connecting = phase != "exchange" or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    ssl_error = find_ssl_error(exc) if connecting else None
    if ssl_error is not None and not is_broken_connection(ssl_error):
        return PbxTlsError(f"{describe_tls_failure(ssl_error, tls)} ({origin})")
    # Connected, then cut off while setting up TLS (a TCP connect is refused, not reset):
    # EOF from the TLS layer, or a reset that httpx reports as a ConnectError.
    if ssl_error is not None or (connecting and phase != "connect" and _caused_by(exc, _CUT_OFF)):
        return PbxTransportError(
            f"{context}: the connection to the PBX broke off during the TLS handshake"
        )
    timed_out = isinstance(exc, TimeoutError | httpx.TimeoutException)
    if connecting and timed_out:
        return PbxUnreachable(f"cannot reach the PBX at {origin}: connection timed out")
    if isinstance(exc, httpx.ConnectError) or (phase == "connect" and isinstance(exc, OSError)):
        reason = strip_query(str(exc)) or type(exc).__name__
        return PbxUnreachable(
            f"cannot reach the PBX at {origin}: {reason} (check the URL's host and port, "
            "and that this host may connect to it)"
        )
    if timed_out:
        return PbxTransportError(f"{context}: the PBX did not answer in time")
    if isinstance(
        exc,
        httpx.RemoteProtocolError
        | httpx.ReadError
        | httpx.WriteError
        | OSError
        | http.client.HTTPException
        | ValueError,  # http.client reading from a connection closed under it
    ):
        return PbxTransportError(f"{context}: the connection to the PBX broke off")
    return PbxTransportError(f"{context}: talking to the PBX failed ({type(exc).__name__})")


def _caused_by(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether `exc` or an exception in its cause/context chain is one of `types`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
