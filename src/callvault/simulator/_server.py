"""A simulator's web server: uvicorn on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import uvicorn
from starlette.types import ASGIApp

from callvault.simulator._tls import ServerCertificate

# Per-simulator setup and teardown, entered on the server's loop before serving starts and
# left once serving has ended (or failed to start).
ServingHook = Callable[[], AbstractAsyncContextManager[object]]


class StartupError(RuntimeError):
    """The server did not start; raised by :meth:`BackgroundServer.start`."""


class BackgroundServer:
    """Serves an ASGI app on a socket bound at construction (``port`` 0 picks a free port).

    :meth:`start` runs uvicorn on a new event loop in a daemon thread and returns once the
    server has started; :meth:`stop` may be called from any thread, more than once.
    """

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        # create_server leaves proto 0, and asyncio sets TCP_NODELAY only on sockets whose
        # proto is IPPROTO_TCP: without this, every small answer (login, get_random) waited
        # ~40 ms for the client's delayed ACK (Nagle). Accepted sockets copy the proto.
        self._sock = socket.socket(
            family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=sock.detach()
        )
        self.port: int = self._sock.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    def start(
        self,
        app: ASGIApp,
        *,
        log_level: str,
        thread_name: str,
        ssl_context: ssl.SSLContext | None = None,
        serving: ServingHook | None = None,
        **options: Any,
    ) -> None:
        """Serve `app` in the background; `options` go to :class:`uvicorn.Config` too.

        Raises :class:`StartupError` (after stopping) if it has not started within 15 s.
        """
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        ssl_factory = None
        if ssl_context is not None:
            context = ssl_context

            def ssl_factory(
                _config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]
            ) -> ssl.SSLContext:
                return context

        _quiet_intended_drops()
        config = uvicorn.Config(
            # No log_config: leave the process's logging alone; no access log: URLs hold
            # tokens and randoms.
            app,
            log_config=None,
            log_level=log_level,
            access_log=False,
            server_header=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            ssl_context_factory=ssl_factory,
            **options,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, args=(self._server, serving), name=thread_name, daemon=True
        )
        self._thread.start()
        if not self._ready.wait(15) or self._startup_error is not None:
            self.stop()
            raise StartupError(f"the simulator did not start: {self._startup_error!r}")

    def _run(self, server: uvicorn.Server, serving: ServingHook | None) -> None:
        try:
            asyncio.run(self._main(server, serving))
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._startup_error = exc
            self._ready.set()

    async def _main(self, server: uvicorn.Server, serving: ServingHook | None) -> None:
        hook: AbstractAsyncContextManager[object] = (
            serving() if serving is not None else contextlib.nullcontext()
        )
        async with hook:
            serve = asyncio.create_task(server.serve(sockets=[self._sock]))
            # uvicorn offers no startup event to wait on, only the `started` flag.
            while not server.started and not serve.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if serve.done():
                await serve  # raises the startup error
            self._ready.set()
            await serve

    def stop(self) -> None:
        """Stop serving and wait (up to 15 s) for the thread to end."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        else:
            self._sock.close()  # never served
        self._thread = None
        self._server = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class _DropFilter(logging.Filter):
    """Hides uvicorn's complaint about the bodies we cut short on purpose (drop faults)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def _quiet_intended_drops() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropFilter) for f in logger.filters):
        logger.addFilter(_DropFilter())


class _Config(Protocol):
    host: str
    tls: bool
    serial: str


C = TypeVar("C", bound=_Config)


class ServedPbx(Generic[C]):
    """What every simulated PBX offers about its server, whatever its API: the
    context manager, whether it runs, and what a client needs to reach and trust it.
    A subclass sets `config`, `_server`, `_port` and `_certificate`, and defines `start`
    and `stop`."""

    config: C
    _server: BackgroundServer | None
    _port: int
    _certificate: ServerCertificate | None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.running

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{scheme}://{host}:{self._port}"

    @property
    def serial(self) -> str:
        return self.config.serial

    @property
    def cert_sha256(self) -> str | None:
        """Hex SHA-256 of the server certificate (DER); None for plain HTTP."""
        return self._certificate.sha256 if self._certificate is not None else None

    @property
    def ca_file(self) -> Path | None:
        """PEM file of the self-signed certificate (it is its own CA); None for plain HTTP."""
        return self._certificate.cert_file if self._certificate is not None else None
