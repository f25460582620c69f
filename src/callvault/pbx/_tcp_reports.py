"""Reports over TCP: the S-Series API v2.0.0 "Report Method = TCP" (spec section 6.1).

The app server is the TCP client: it connects to the report port on the PBX, sends a text
login block (``Action: login``, ``Username:``, ``Secret:`` with the clear-text password,
``Version:``, an empty line), and then receives the reports on that connection until it
drops. The documents were cut off after that; what is unknown is handled every plausible
way at once:

- The answer to the login: an AMI-style block (``Response: Success`` / ``Response: Error``
  with ``Message:``, up to an empty line, after an optional banner line), a JSON object
  (``{"status":"Success"}`` / ``{"status":"Failed","errno":"20003"}``), or none at all (the
  first report, or `login_answer_wait` seconds of quiet on an open connection, count as
  acceptance). A refusal raises `LoginFailed` (`LoginLockedOut` for errno 20002 or a
  message about a lock) at once and is never retried: five failed logins lock the IP out.
  A connection closed before any answer is ambiguous (a refusal of a PBX that does not
  answer, or a drop): the second such close in a row is taken as a refusal.
- The framing: one JSON object per line, objects followed by a blank line, or objects
  back to back. The stream is cut with an incremental ``JSONDecoder.raw_decode`` over a
  buffer; whitespace between objects is skipped; anything that is not a report (text, a
  truncated or broken object, a JSON object without ``event``/``action``) is logged and
  skipped, re-synchronising at the next line that starts an object or the next
  ``{"event"``/``{"action"``.
- TLS: plain TCP unless `tls` is given (the documents speak of a TCP port only).

After a drop the client connects again with backoff and, once logged in, first yields an
`EventsResumed` whose `since` is when the connection was lost: reports of the gap are not
replayed, reconcile them from the CDR export. The password is never logged nor put in an
exception (text the PBX sends back is masked too).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from callvault.pbx._errors import EventParseError, LoginFailed, LoginLockedOut
from callvault.pbx._events import MAX_EVENT_BYTES, parse_event
from callvault.pbx._pseries_events import EventsResumed
from callvault.pbx._tls import TlsOptions, build_ssl_context
from callvault.pbx._types import Event, EventFormat

log = logging.getLogger("callvault.pbx.tcp_reports")

READ_SIZE = 65536
MAX_UNANSWERED_LOGINS = 2  # closes before any answer, in a row, taken as a refusal
STABLE_CONNECTION_S = 60.0  # a connection that lasted this long resets the backoff
_SUCCESS = frozenset({"success", "ok", "accepted", "authentication accepted"})
_FAILURE = frozenset({"failed", "failure", "fail", "error", "denied", "refused", "rejected"})
_ANSWER_KEYS = ("status", "response", "result")
_RESPONSE_LINE = re.compile(r"response[ \t]*:", re.IGNORECASE)
_BLOCK_END = re.compile(r"\r?\n[ \t]*\r?\n|\n(?=\{)")
_NUMBER_TAIL = re.compile(r"[0-9.eE+\-]{0,32}")
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_REPORT_MARKERS = ('{"event"', '{"action"')


@dataclass(frozen=True, slots=True)
class _Item:
    """One piece of the stream: a report's JSON text, an answer to the login, or junk."""

    kind: Literal["report", "answer", "junk"]
    text: str
    accepted: bool = False
    refused: bool = False  # an answer that says no (neither: e.g. {"status":"Heartbeat"})
    errno: str | None = None
    message: str = ""


def _answer_from_fields(text: str, fields: dict[str, str]) -> _Item:
    lowered = {k.strip().lower(): v.strip() for k, v in fields.items()}
    verdict = next((lowered[k] for k in _ANSWER_KEYS if k in lowered), "")
    errno = lowered.get("errno") or None
    return _Item(
        "answer",
        text,
        accepted=verdict.lower() in _SUCCESS,
        refused=verdict.lower() in _FAILURE or (errno is not None and errno != "0"),
        errno=errno,
        message=lowered.get("message", "") or verdict,
    )


def _looks_incomplete(buf: str, exc: json.JSONDecodeError) -> bool:
    """Whether decoding failed only because the object has not fully arrived yet."""
    if exc.pos >= len(buf) or exc.msg.startswith("Unterminated string"):
        return True
    tail = buf[exc.pos :]
    if exc.msg.startswith("Invalid \\uXXXX escape"):
        return len(buf) - exc.pos <= 6
    if exc.msg == "Expecting value" and any(word.startswith(tail) for word in _LITERALS):
        return True
    return _NUMBER_TAIL.fullmatch(tail) is not None


class _Framer:
    """Cuts the received text into reports, login answers and junk, whatever the framing."""

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._buf = ""
        self._limit = limit
        self._decoder = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        self._buf += self._utf8.decode(data)

    @property
    def empty(self) -> bool:
        return not self._buf.strip()

    def take(self, *, final: bool = False) -> _Item | None:
        """The next complete item, or None until more data arrives. `final`: no more data
        will come (or it is time to decide): what is left counts as it stands."""
        buf = self._buf
        start = len(buf) - len(buf.lstrip())
        if start == len(buf):
            self._buf = ""
            return None
        if buf[start] == "{":
            return self._json(buf, start, final)
        return self._text(buf, start, final)

    def _cut(self, end: int) -> None:
        self._buf = self._buf[end:]

    def _text(self, buf: str, start: int, final: bool) -> _Item | None:
        if _RESPONSE_LINE.match(buf, start):  # an AMI-style answer block
            match = _BLOCK_END.search(buf, start)
            if match is not None:
                end = match.end()
            elif final or len(buf) - start > self._limit:
                end = len(buf)
            else:
                return None
            block = buf[start:end]
            self._cut(end)
            fields: dict[str, str] = {}
            for line in block.splitlines():
                key, colon, value = line.partition(":")
                if colon:
                    fields.setdefault(key.strip(), value.strip())
            return _answer_from_fields(block, fields)
        ends = [i for i in (buf.find("\n", start) + 1, buf.find("{", start)) if i > start]
        if ends:
            end = min(ends)
        elif final or len(buf) - start > self._limit:
            end = len(buf)
        else:
            return None
        self._cut(end)
        return _Item("junk", buf[start:end])

    def _json(self, buf: str, start: int, final: bool) -> _Item | None:
        try:
            document, end = self._decoder.raw_decode(buf, start)
        except json.JSONDecodeError as exc:
            restart = self._restart(buf, start, incomplete=_looks_incomplete(buf, exc))
            if restart is not None:
                end = restart
            elif final or len(buf) - start > self._limit:
                end = len(buf)
            else:
                return None
            self._cut(end)
            return _Item("junk", buf[start:end])
        text = buf[start:end]
        self._cut(end)
        if isinstance(document, dict):
            if "event" in document or "action" in document:
                return _Item("report", text)
            keys = {str(k).lower(): k for k in document}
            if any(k in keys for k in _ANSWER_KEYS):
                fields = {k: str(v) for k, v in document.items() if not isinstance(v, dict | list)}
                return _answer_from_fields(text, fields)
        return _Item("junk", text)

    def _restart(self, buf: str, start: int, *, incomplete: bool) -> int | None:
        """Where the stream may go on after a broken (or not yet complete) object at
        `start`: the next object at the start of a line, or the next ``{"event"`` /
        ``{"action"`` that decodes (for an object that may only be incomplete, such a
        marker counts only if it decodes to the end of what has arrived); for a broken
        object also the next line, whatever it holds."""
        next_line: int | None = None
        if not incomplete:
            newline = buf.find("\n", start)
            if 0 <= newline < len(buf) - 1:
                next_line = newline + 1
        at = start
        while (at := buf.find("{", at + 1)) >= 0:
            if next_line is not None and at > next_line:
                break
            line_start = buf[at - 1] == "\n"
            if not (line_start or buf.startswith(_REPORT_MARKERS, at)):
                continue
            try:
                _, end = self._decoder.raw_decode(buf, at)
            except json.JSONDecodeError:
                continue
            if line_start or not incomplete or not buf[end:].strip():
                return at
        return next_line


def _mask(text: str, secret: str, limit: int = 120) -> str:
    """`text` from the PBX, fit for a log line: the password masked, shortened."""
    if secret:
        text = text.replace(secret, "***")
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_field(name: str, value: str) -> None:
    if not value or any(ch in value for ch in "\r\n"):
        raise ValueError(f"the {name} must be non-empty and on one line")


def login_block(username: str, password: str, version: str) -> bytes:
    """The text login block: ``Key: value`` lines ended by an empty line (CRLF, as AMI)."""
    lines = ["Action: login", f"Username: {username}", f"Secret: {password}"]
    if version:
        lines.append(f"Version: {version}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _refusal(item: _Item, where: str, password: str) -> LoginFailed | LoginLockedOut:
    message = _mask(item.message or item.text, password)
    if item.errno == "20002" or "lock" in item.message.lower():
        return LoginLockedOut(
            f"the PBX's TCP report port at {where} refused the login: this IP is locked out "
            f"({message})",
            errno=item.errno or "20002",
        )
    return LoginFailed(
        f"the PBX's TCP report port at {where} refused the login (wrong API username or "
        f"password?): {message}",
        errno=item.errno or "20003",
    )


def _unanswered_refusal(where: str, count: int) -> LoginFailed:
    return LoginFailed(
        f"the PBX's TCP report port at {where} closed the connection {count} times in a row "
        "without answering the login: taken as a refusal (wrong API username or password?)",
        errno="20003",
    )


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive, so that a silently dead connection is noticed within minutes."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


class _Unanswered(Exception):
    """The connection ended before the PBX answered the login."""


async def _await_answer(
    reader: asyncio.StreamReader,
    framer: _Framer,
    *,
    where: str,
    password: str,
    wait: float,
) -> tuple[list[_Item], bool]:
    """Read until the login is answered: the reports that came with the answer, and
    whether the PBX answered at all (False: accepted by its silence or a first report).

    Raises the refusal, or _Unanswered when the connection ends first. No answer within
    `wait` seconds on a connection that stays open counts as acceptance (whatever partial
    text has arrived is left to the reading of reports, which still honours a refusal that
    comes before the first report).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        while (item := framer.take()) is not None:
            if item.kind == "report":
                return [item], False  # a PBX that does not answer: reports are the answer
            if item.kind == "answer" and item.refused:
                raise _refusal(item, where, password)
            if item.kind == "answer" and item.accepted:
                return [], True
            log.info(
                "TCP reports from %s: skipping %s before the login answer",
                where,
                _mask(item.text, password),
            )
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.info("TCP reports from %s: no answer to the login; taken as accepted", where)
            return [], False
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a
            # cancellation that arrives with the data, and the stream would not stop.
            async with asyncio.timeout(remaining):
                data = await reader.read(READ_SIZE)
        except TimeoutError:
            continue
        if not data:
            # The end: decide on what has arrived (an answer block without its empty line).
            while (item := framer.take(final=True)) is not None:
                if item.kind == "answer" and item.refused:
                    raise _refusal(item, where, password)
                if item.kind == "answer" and item.accepted:
                    return [], True
                if item.kind == "report":
                    return [item], False
            raise _Unanswered
        framer.feed(data)


def _parse(item: _Item, where: str, password: str) -> Event | None:
    try:
        return parse_event(item.text.encode())
    except EventParseError as exc:
        log.warning(
            "TCP reports from %s: skipping a report that does not parse (%s): %s",
            where,
            exc,
            _mask(item.text, password),
        )
        return None


async def tcp_reports(
    host: str,
    port: int,
    username: str,
    password: str,
    *,
    version: str = "2.0.0",
    tls: TlsOptions | None = None,
    local_address: str | None = None,
    backoff_base: float = 0.5,
    backoff_max: float = 30.0,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    clock: Callable[[], float] | None = None,
    connect_timeout: float = 10.0,
    login_answer_wait: float = 5.0,
) -> AsyncIterator[Event]:
    """The PBX's reports over its TCP report port, for as long as the caller iterates.

    Connects to `host`:`port` (TLS only with `tls`; from `local_address` if given), logs
    in with the clear-text `password` and report format `version` (``"2.0.0"``: key
    ``event``), then yields each report as `parse_event` makes it (`NewCdrEvent`,
    `BootUpEvent`, `Event`). A lost or refused connection is tried again with exponential
    backoff (`backoff_base` doubling up to `backoff_max` seconds, jittered; `sleep` is
    awaited for it); after every reconnection an `EventsResumed` comes first, its `since`
    the Unix time (`clock`, default `time.time`) the connection was lost.

    Raises `LoginFailed` (or `LoginLockedOut`) when the PBX refuses the login, at once and
    without trying again; ValueError for a username or password that cannot be sent.
    """
    _check_field("username", username)
    _check_field("password", password)
    if any(ch in version for ch in "\r\n"):
        raise ValueError("the version must be on one line")
    wait = sleep if sleep is not None else asyncio.sleep
    now = clock if clock is not None else time.time
    context = build_ssl_context(tls) if tls is not None else None
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    failures = 0  # consecutive failed or short-lived connections: the backoff
    unanswered = 0  # consecutive connections closed before the login was answered
    lost_at: float | None = None

    def backoff() -> float:
        delay = min(backoff_max, backoff_base * 2.0 ** max(failures - 1, 0))
        return delay * random.uniform(0.5, 1.0)

    while True:
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    local_addr=(local_address, 0) if local_address else None,
                    limit=READ_SIZE,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            failures += 1
            delay = backoff()
            log.warning(
                "TCP reports from %s: cannot connect (%s); again in %.1f s",
                where,
                type(exc).__name__,
                delay,
            )
            await wait(delay)
            continue
        _keepalive(writer)
        opened = time.monotonic()
        framer = _Framer()
        logged_in = False
        received = False  # an explicit success answer or a report on this connection
        reason = "closed by the PBX"
        try:
            try:
                writer.write(login_block(username, password, version))
                await writer.drain()
                first, answered = await _await_answer(
                    reader, framer, where=where, password=password, wait=login_answer_wait
                )
            except (_Unanswered, OSError, ssl.SSLError) as exc:
                unanswered += 1
                if unanswered >= MAX_UNANSWERED_LOGINS:
                    raise _unanswered_refusal(where, unanswered) from None
                reason = f"closed before answering the login ({type(exc).__name__})"
            else:
                logged_in = True
                log.info("TCP reports from %s: logged in as %r", where, username)
                if lost_at is not None:
                    since, lost_at = lost_at, None
                    yield EventsResumed(
                        name="EventsResumed",
                        sn="",
                        fields={"since": since},
                        format=EventFormat.V2_0_0,
                        since=since,
                    )
                # A refusal is still taken from a PBX that did not answer (yet), until the
                # first report; after an explicit answer or a report it is only logged.
                received = answered or bool(first)
                if received:
                    unanswered = 0
                for item in first:
                    event = _parse(item, where, password)
                    if event is not None:
                        yield event
                async for item in _items(reader, framer):
                    if item.kind == "report":
                        received, unanswered = True, 0
                        event = _parse(item, where, password)
                        if event is not None:
                            yield event
                    elif item.kind == "answer":
                        if item.refused and not received:
                            raise _refusal(item, where, password)  # a slow refusal
                        log.info(
                            "TCP reports from %s: ignoring %s", where, _mask(item.text, password)
                        )
                    else:
                        log.warning(
                            "TCP reports from %s: skipping %s, not a report",
                            where,
                            _mask(item.text, password),
                        )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            reason = type(exc).__name__
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
        if logged_in and not received and time.monotonic() - opened < STABLE_CONNECTION_S:
            # Taken as accepted by the PBX's silence, closed before a word: as unanswered.
            unanswered += 1
            if unanswered >= MAX_UNANSWERED_LOGINS:
                raise _unanswered_refusal(where, unanswered)
        if logged_in and lost_at is None:
            lost_at = now()
        if time.monotonic() - opened >= STABLE_CONNECTION_S:
            failures = 0  # it had worked for a while: not a flapping PBX
        failures += 1
        delay = backoff()
        log.warning(
            "TCP reports from %s lost (%s); connecting again in %.1f s", where, reason, delay
        )
        await wait(delay)


async def _items(reader: asyncio.StreamReader, framer: _Framer) -> AsyncIterator[_Item]:
    """Every item of the stream until the PBX closes it (what is left then, too)."""
    while True:
        while (item := framer.take()) is not None:
            yield item
        data = await reader.read(READ_SIZE)
        if not data:
            while (item := framer.take(final=True)) is not None:
                yield item
            return
        framer.feed(data)
