"""The TCP report port of API v2.0.0 ("Report Method = TCP", spec section 6.1).

The app server connects, sends a text login block (``Action: login``, ``Username:``,
``Secret:`` with the clear-text password, ``Version:``, then an empty line), is answered,
and then receives every report on the open connection until it drops. What the documents
leave open is a switch of :class:`~callvault.simulator.SimulatorConfig`: the answer
(``tcp_login_answer``), the framing of the reports (``tcp_framing``) and TLS
(``tcp_report_tls``, off: the documents speak of a plain TCP port).

Reports are written only to connections open when they are sent: while no app server is
connected, nothing is kept for it (the conservative choice: an app server must reconcile
the gap from the CDR export, never count on a replay the documents do not promise).
Login failures count towards the same per-IP lockout as HTTP logins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field

from callvault.simulator._state import ApiFailure, PbxState

LOGIN_TIMEOUT_SECONDS = 10.0
MAX_LOGIN_BLOCK_BYTES = 8192
TRANSPORTS = ("http", "tcp")
LOGIN_ANSWERS = ("ami", "json", "silent")
FRAMINGS = {"newline": b"\n", "blank-line": b"\r\n\r\n", "concatenated": b""}
# The junk frames of the tcp_junk_next fault, used in turn.
JUNK_FRAMES = (
    b"this is not a report",
    b'{"event":"NewCdr","callid":',
    b'{"status":"Heartbeat"}',
)
_FAILURE_MESSAGES = {
    "20002": "User login failure (user locked out)",
    "20003": "Authentication failed",
}


def check_tcp_settings(transport: str, answer: str, framing: str) -> None:
    """ValueError for a value the switches do not know."""
    if transport not in TRANSPORTS:
        raise ValueError(f"report_transport must be one of {', '.join(TRANSPORTS)}")
    if answer not in LOGIN_ANSWERS:
        raise ValueError(f"tcp_login_answer must be one of {', '.join(LOGIN_ANSWERS)}")
    if framing not in FRAMINGS:
        raise ValueError(f"tcp_framing must be one of {', '.join(FRAMINGS)}")


def login_answer(style: str, errno: str | None) -> bytes:
    """The answer to a login block: success when `errno` is None."""
    if style == "silent":
        return b""
    if style == "json":
        payload = {"status": "Success"} if errno is None else {"status": "Failed", "errno": errno}
        return json.dumps(payload, separators=(",", ":")).encode() + b"\r\n"
    if errno is None:
        return b"Response: Success\r\nMessage: Authentication accepted\r\n\r\n"
    message = _FAILURE_MESSAGES.get(errno, "Authentication failed")
    return f"Response: Error\r\nMessage: {message}\r\n\r\n".encode()


async def read_login_block(reader: asyncio.StreamReader) -> dict[str, str] | None:
    """The ``Key: value`` lines up to the first empty line (keys lowercased); None when the
    connection ends first or the block is too long."""
    fields: dict[str, str] = {}
    size = 0
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            return None
        size += len(line)
        if size > MAX_LOGIN_BLOCK_BYTES:
            return None
        text = line.decode("utf-8", "replace").strip()
        if not text:
            if fields:
                return fields
            continue  # empty lines before the block
        key, colon, value = text.partition(":")
        if colon:
            fields.setdefault(key.strip().lower(), value.strip())


@dataclass(eq=False)
class _Connection:
    """One logged-in app server on the report port; touched on the server's loop only."""

    writer: asyncio.StreamWriter
    # (frame, is_junk) in order; None: close the connection.
    queue: asyncio.Queue[tuple[bytes, bool] | None] = field(default_factory=asyncio.Queue)
    sent: int = 0


class TcpReportServer:
    """The report port: accepts app servers on its own socket (bound at construction, so the
    port is known before serving) and writes reports to the logged-in ones.

    :meth:`serve` and :meth:`aclose` run on the simulator's loop; :meth:`send`,
    :meth:`drop_all` and the counters may be used from any thread.
    """

    def __init__(
        self,
        state: PbxState,
        *,
        host: str,
        port: int,
        login_answer: str,
        framing: str,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        self._sock = socket.socket(
            family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=sock.detach()
        )
        self.port: int = self._sock.getsockname()[1]
        self._state = state
        self._answer = login_answer
        self._delimiter = FRAMINGS[framing]
        self._ssl = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._junk_turn = 0
        self._lock = threading.Condition()
        self._pending = 0  # reports (and dispatches) not yet written or discarded
        self.connection_count = 0
        self.reports_sent = 0
        self.reports_dropped = 0  # sent while no app server was connected: not kept
        self.login_blocks: list[dict[str, str]] = []  # as received, Secret masked

    # -- life cycle (on the loop) -----------------------------------------------------------

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._accepted, sock=self._sock, ssl=self._ssl, limit=MAX_LOGIN_BLOCK_BYTES * 2
        )

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        else:
            self._sock.close()
        self._loop = None
        with self._lock:
            self._pending = 0
            self._lock.notify_all()

    # -- from any thread --------------------------------------------------------------------

    def send(self, bodies: list[bytes]) -> None:
        """Write `bodies`, in order, to every app server connected now (none: dropped)."""
        loop = self._loop
        if loop is None or not bodies:
            return
        with self._lock:
            self._pending += 1
        try:
            loop.call_soon_threadsafe(self._dispatch, list(bodies))
        except RuntimeError:  # the loop is closing
            self._settle(1)

    def drop_all(self) -> None:
        """Close every report connection (a reboot)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._close_all)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every report sent was written or discarded; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    # -- on the loop ------------------------------------------------------------------------

    def _settle(self, count: int) -> None:
        with self._lock:
            self._pending = max(self._pending - count, 0)
            self._lock.notify_all()

    def _dispatch(self, bodies: list[bytes]) -> None:
        try:
            connections = list(self._connections)
            if not connections:
                with self._lock:
                    self.reports_dropped += len(bodies)
                return
            frames: list[tuple[bytes, bool]] = []
            for body in bodies:
                if self._state.take("tcp_junk_next"):
                    frames.append((JUNK_FRAMES[self._junk_turn % len(JUNK_FRAMES)], True))
                    self._junk_turn += 1
                frames.append((body, False))
            for connection in connections:
                with self._lock:
                    self._pending += len(frames)
                for frame in frames:
                    connection.queue.put_nowait(frame)
        finally:
            self._settle(1)

    def _close_all(self) -> None:
        for connection in list(self._connections):
            connection.queue.put_nowait(None)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        connection: _Connection | None = None
        try:
            try:
                async with asyncio.timeout(LOGIN_TIMEOUT_SECONDS):
                    block = await read_login_block(reader)
            except (TimeoutError, ValueError, asyncio.LimitOverrunError):
                block = None
            if block is None:
                return
            with self._lock:
                self.login_blocks.append(
                    {k: ("***" if k == "secret" else v) for k, v in block.items()}
                )
            errno = self._check(ip, block)
            answer = login_answer(self._answer, errno)
            if answer:
                writer.write(answer)
                await writer.drain()
            if errno is not None or self._state.take("tcp_drop_next"):
                return
            connection = _Connection(writer)
            self._connections.add(connection)
            with self._lock:
                self.connection_count += 1
            await self._write_reports(reader, connection)
        except (OSError, ssl.SSLError):
            pass  # the app server went away
        finally:
            if connection is not None:
                self._connections.discard(connection)
                left = 0
                while not connection.queue.empty():
                    left += connection.queue.get_nowait() is not None
                with self._lock:
                    self.connection_count -= 1
                self._settle(left)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def _check(self, ip: str, block: dict[str, str]) -> str | None:
        """None when the block logs in; else the errno of the refusal."""
        if block.get("action", "").lower() != "login":
            return "20003"
        try:
            self._state.tcp_login(
                ip=ip, username=block.get("username", ""), secret=block.get("secret", "")
            )
        except ApiFailure as failure:
            return failure.errno
        return None

    async def _write_reports(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        """Write queued reports until the app server leaves, the connection is dropped
        (tcp_close_after_reports, a reboot) or the server stops."""
        gone = asyncio.ensure_future(reader.read())  # EOF (or anything) from the app server
        try:
            while True:
                item = asyncio.ensure_future(connection.queue.get())
                done, _ = await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
                if item not in done:
                    item.cancel()
                    return
                entry = item.result()
                if entry is None:
                    return
                try:
                    await self._write(connection, *entry)
                finally:
                    self._settle(1)
                limit = self._state.faults.tcp_close_after_reports
                if limit > 0 and connection.sent >= limit:
                    return
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gone

    async def _write(self, connection: _Connection, frame: bytes, junk: bool) -> None:
        """One frame in one write, with its delimiter; junk is not counted as a report."""
        connection.writer.write(frame + self._delimiter)
        await connection.writer.drain()
        if junk:
            return
        connection.sent += 1
        with self._lock:
            self.reports_sent += 1
        with self._state.lock:
            self._state.events_delivered += 1
