"""Serving HTTP: the one place that binds sockets and runs uvicorn for callvault's servers.

`callvault serve` runs two servers (the events receiver and the web app), `callvault web`
and `callvault demo` one each; all of them are built here, the same way:

* the listening socket is bound first (`bind_socket`), so a busy port is one line
  (`ListenError`) before anything claims to be serving;
* uvicorn never handles signals itself (`Server`): the command owns SIGTERM/SIGINT and
  shuts its servers down in its own order;
* no access log (a request line would show the receiver's secret path), no Server header;
* ``X-Forwarded-For``/``-Proto`` are believed only from one trusted proxy address, and by
  default from none (`proxy_options`): the receiver's source check, the login limiter and
  the audit log key on the peer address;
* a connection must send its request headers within `header_timeout_s` (default 10 s), or
  it is closed: an idle or half-sent connection, from anyone, holds nothing open for long.

`ServerThread` runs a server on an event loop and thread of its own (uvloop's when
installed), which the events receiver uses to keep its hot path off the main loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import socket
import threading
from collections.abc import Callable, Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_HEADER_TIMEOUT_S = 10.0


class ListenError(Exception):
    """A listening socket could not be opened; the message is one line for people."""

    def __init__(self, what: str, host: str, port: int, exc: OSError, hint: str = "") -> None:
        message = f"cannot listen for {what} on {address(host, port)}: {exc.strerror or exc}"
        if exc.errno == errno.EADDRINUSE:
            message += f" ({hint or 'another program uses that port'})"
        super().__init__(message)
        self.errno = exc.errno


def address(host: str, port: int) -> str:
    """``host:port`` as people write it (IPv6 addresses in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket (port 0 picks a free one); OSError if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def listen(what: str, host: str, port: int, *, hint: str = "") -> socket.socket:
    """`bind_socket`, raising `ListenError` (one line naming `what`) when it fails."""
    try:
        return bind_socket(host, port)
    except OSError as exc:
        raise ListenError(what, host, port, exc, hint) from exc


def proxy_options(trusted_proxy: str | None) -> dict[str, Any]:
    """uvicorn's proxy options: X-Forwarded-* believed from `trusted_proxy` only, or never."""
    if not trusted_proxy:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": trusted_proxy}


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: the command owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Send each write at once (TCP_NODELAY). asyncio's loop sets it only on sockets made
    with IPPROTO_TCP, which `bind_socket`'s are not: with Nagle's algorithm on, a response
    written in pieces waited for the client's delayed ACK, about 40 ms on every request of a
    kept-alive connection to `callvault web`."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _protocol_with_header_timeout(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing a connection whose request headers are not
    complete `seconds` after it opened (or after its previous response)."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            _no_delay(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def server_for(
    app: Any,
    *,
    trusted_proxy: str | None = None,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    keep_alive_s: int = 2,
) -> Server:
    """A `Server` for `app` configured as the module docstring says (not started)."""
    config = uvicorn.Config(
        app,
        http=_protocol_with_header_timeout(header_timeout_s),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=keep_alive_s,
        server_header=False,
        **proxy_options(trusted_proxy),
    )
    return Server(config)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # not on this platform: asyncio's own loop does the same, slower
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class ServerThread:
    """A `Server` on an event loop and thread of its own.

    The loop is uvloop's when it is installed: the events receiver gets reports by the
    thousand a second, each on a new connection, and uvloop's C transports take about 20%
    less CPU per report than asyncio's selector loop (bench/events.py). Stop it by setting
    ``server.should_exit``; the future `start` returns is done when it has stopped.
    """

    def __init__(self, server: Server, sock: socket.socket, *, name: str) -> None:
        self._server = server
        self._sock = sock
        self._name = name
        self._outcome: concurrent.futures.Future[None] = concurrent.futures.Future()

    def start(self) -> asyncio.Future[None]:
        """Start serving; the result is done when the server has stopped (or failed)."""
        thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        thread.start()
        return asyncio.wrap_future(self._outcome)

    def _main(self) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:
            self._outcome.set_exception(exc)
        else:
            self._outcome.set_result(None)


async def serve_until(server: Server, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve on `sock` until `stop` is set (or the server ends by itself), then let the
    requests in flight finish."""
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        await serving
