"""Push reports: their JSON in each format, and the delivery loop that re-sends until 200."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from callvault.pbx import CallDetail, EventFormat
from callvault.simulator._state import EventTarget, PbxState

USER_AGENT = "WebAPI"
POST_TIMEOUT_SECONDS = 5.0
_PATH_SAFE = "/?&=%:@!$'()*+,;~-._"


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def newcdr_keys(v2: bool) -> list[str]:
    """The NewCdr report's keys in the PBX's order (that of the v2 example report [D]; v2
    spells the destination trunk ``dsttrcunkname``). The CDR CSV export has its own column
    order: :func:`csv_columns`."""
    return [
        "callid",
        "timestart",
        "callfrom",
        "callto",
        "callduraction",
        "talkduraction",
        "srctrunkname",
        "dsttrcunkname" if v2 else "desttrunkname",
        "pincode",
        "status",
        "type",
        "recording",
        "didnumber",
        "agentringtime",
        "sn",
    ]


def cdr_values(cdr: CallDetail, v2: bool) -> dict[str, str]:
    """Every NewCdr field of `cdr` as the string the PBX sends, in NewCdr key order."""
    values = [
        cdr.callid,
        cdr.timestart,
        cdr.callfrom,
        cdr.callto,
        _text(cdr.callduration),
        _text(cdr.talkduration),
        cdr.srctrunkname,
        cdr.dsttrunkname,
        cdr.pincode,
        cdr.status,
        cdr.type,
        cdr.recording or "",
        cdr.didnumber,
        _text(cdr.agentringtime),
        cdr.sn,
    ]
    return dict(zip(newcdr_keys(v2), values, strict=True))


def csv_columns(v2: bool) -> list[str]:
    """The header row of the CDR CSV export (``cdr/download``), in its column order.

    Fourteen columns, ``pincode`` after ``type`` and no ``agentringtime``, for v1.1.0 and
    v2.0.0 alike. What this rests on (tags as in the protocol reference):

    * [D] V1 ``download-cdr.html``: "The CDR file is in CSV format". No vendor page we
      found lists the columns [?].
    * [3P] v1.1.0: a Laravel console command (``GetCDRRecords``, found in the code index by
      "cdr/get_random" with ``extid``) skips the first row and reads cells 0-13 by
      position as callid, timestart, callfrom, callto, callduraction, talkduraction,
      srctrunkname, the destination trunk, status, type, pincode, recording, didnumber,
      sn. Issue 8 reports a second peer reading these positions, and both failing on the
      older simulator, which put pincode before status and added agentringtime.
    * [3P] v2.0.0: a C# SAP Business One add-in (code index, "api/v2.0.0/cdr/download"
      with ``number``) splits every line after the first at commas into the same 14
      columns in the same order. So v2 keeps the v1.1.0 order, also without agentringtime.
    * [I] The first row is a header naming the columns with the NewCdr keys (the peers
      skip it; a Cloud-PBX v2 client reads it by name, protocol reference section 7.2). The
      v2 destination-trunk column is assumed to be spelled as in v2 NewCdr,
      ``dsttrcunkname``; no peer shows the header's spelling [?].
    * The NewCdr report keeps its own key order (:func:`newcdr_keys`), which differs.

    ``callvault.pbx`` parses the export by header name, never by position.
    """
    return [
        "callid",
        "timestart",
        "callfrom",
        "callto",
        "callduraction",
        "talkduraction",
        "srctrunkname",
        "dsttrcunkname" if v2 else "desttrunkname",
        "status",
        "type",
        "pincode",
        "recording",
        "didnumber",
        "sn",
    ]


def csv_row(cdr: CallDetail, v2: bool) -> dict[str, str]:
    """One row of the CDR CSV export: the NewCdr values of `cdr` under :func:`csv_columns`."""
    values = cdr_values(cdr, v2)
    return {column: values[column] for column in csv_columns(v2)}


# Fields the legacy format leaves out when empty (v1 examples omit them; desttrunkname stays).
_LEGACY_OMITTED_WHEN_EMPTY = {"srctrunkname", "pincode", "recording", "didnumber", "agentringtime"}


def dump_pairs(pairs: Sequence[tuple[str, Any]]) -> bytes:
    """A compact JSON object from ordered pairs, written by hand so that legacy reports may
    repeat a key; values may be nested (written as ordinary JSON)."""
    body = ",".join(
        f"{json.dumps(k)}:{json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
        for k, v in pairs
    )
    return ("{" + body + "}").encode()


# The spellings the v2 documents show in places (spec 6.3), for the v2_spellings_rate fault.
_V2_ODD_STATUS = {"ANSWERED": "ANSWERD", "NO ANSWER": "NO ANSWERED"}
_V2_ODD_KEYS = {"dsttrcunkname": "dstrunkname"}


def newcdr_body(cdr: CallDetail, fmt: EventFormat, *, odd_spellings: bool = False) -> bytes:
    """The NewCdr report of `cdr` in the format an app server asked for at login.

    `odd_spellings` (format 2.0.0 only): the status and trunk key as the v2 documents spell
    them in places (ANSWERD, NO ANSWERED, dstrunkname).
    """
    if fmt is EventFormat.V2_0_0:
        pairs = list(cdr_values(cdr, v2=True).items())
        if odd_spellings:
            pairs = [
                (_V2_ODD_KEYS.get(k, k), _V2_ODD_STATUS.get(v, v) if k == "status" else v)
                for k, v in pairs
            ]
        return dump_pairs([("event", "NewCdr"), *pairs])
    pairs = [("action", "NewCdr"), *cdr_values(cdr, v2=False).items()]
    if fmt is EventFormat.LEGACY:
        pairs = [(k, v) for k, v in pairs if v or k not in _LEGACY_OMITTED_WHEN_EMPTY]
    return dump_pairs(pairs)


def call_released_body(callid: str, extensions: list[str], serial: str, fmt: EventFormat) -> bytes:
    """The BYE report of a call: legacy repeats the ``ext`` key once per party (invalid JSON
    that most parsers collapse to the last party); 1.0.2 and 2.0.0 use a ``call`` array."""
    if fmt is EventFormat.LEGACY:
        parties = [f'"ext":{{"extid":{json.dumps(ext)}}}' for ext in extensions]
        head = f'"action":"BYE","callid":{json.dumps(callid)}'
        return ("{" + ",".join([head, *parties, f'"sn":{json.dumps(serial)}']) + "}").encode()
    key = "event" if fmt is EventFormat.V2_0_0 else "action"
    payload = {
        key: "BYE",
        "callid": callid,
        "call": [{"ext": {"extid": ext}} for ext in extensions],
        "sn": serial,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def bootup_body(serial: str, fmt: EventFormat) -> bytes:
    """The BootUp report: the PBX restarted and every token is gone."""
    key = "event" if fmt is EventFormat.V2_0_0 else "action"
    return dump_pairs([(key, "BootUp"), ("sn", serial)])


def post_request(url: str, body: bytes) -> bytes:
    """The whole HTTP request that pushes `body` to `url`: request line, headers and body.

    Headers as in the documents' report examples (``User-Agent: WebAPI``, JSON both ways),
    plus ``Content-Length`` and ``Connection: close``: one report per connection.
    """
    parts = urlsplit(url)
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_PATH_SAFE)
    head = (
        f"POST {target} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode("latin-1", "replace") + body


async def post_once(url: str, request: bytes) -> int | None:
    """Send `request` (from :func:`post_request`) to `url` in ONE write on a new connection
    and return the answer's status code; None when there is no valid answer in time.

    One write, as the PBX is taken to do: an app server that reads its socket once then
    still has the whole report. (An HTTP client library writes the head and the body
    separately, and peers that read once lost the body of most reports.)
    """
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    context = ssl.create_default_context() if secure else None
    try:
        port = parts.port or (443 if secure else 80)  # ValueError: not a port
        if parts.hostname is None:
            return None
        async with asyncio.timeout(POST_TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
            try:
                writer.write(request)
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except (OSError, ssl.SSLError, TimeoutError, ValueError):
        return None
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return None
    return int(fields[1])


class EventPusher:
    """Delivers reports on the simulator's event loop, re-sending until the app server says 200.

    A report bound to a token stops when the token dies (reports need a live token); each
    delivery counts as interaction and refreshes the token. Thread-safe: :meth:`push` may be
    called from any thread. After :meth:`aclose` nothing more is sent.
    """

    def __init__(
        self,
        state: PbxState,
        loop: asyncio.AbstractEventLoop,
        *,
        retry_interval: float,
        max_retries: int,
    ) -> None:
        self._state = state
        self._loop = loop
        self._retry_interval = retry_interval
        self._max_retries = max_retries
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # touched on the loop only

    def push(self, target: EventTarget, body: bytes, token: str | None) -> None:
        """Queue one report for `target`; `token` None sends it without a live token (BootUp)."""
        self.push_all(target, [body], token)

    def push_all(self, target: EventTarget, bodies: list[bytes], token: str | None) -> None:
        """Queue reports for `target`, delivered one after the other in this order (each
        re-sent until 200 or given up before the next); a call's reports never overtake
        each other. Reports of different calls travel side by side."""
        with self._idle:
            if self._closed:
                return
            self._pending += 1
        with self._state.lock:
            self._state.events_queued += len(bodies)
        try:
            self._loop.call_soon_threadsafe(self._start, target, bodies, token)
        except RuntimeError:  # loop already closed: the simulator is stopping
            self._done()

    def _start(self, target: EventTarget, bodies: list[bytes], token: str | None) -> None:
        """On the loop: start one delivery, unless the pusher was closed meanwhile (a call
        placed by a background thread while the simulator stops)."""
        if self._closed:
            self._done()
            return
        task = self._loop.create_task(self._deliver(target, bodies, token))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _done(self) -> None:
        with self._idle:
            self._pending = max(self._pending - 1, 0)
            self._idle.notify_all()

    @property
    def pending(self) -> int:
        with self._idle:
            return self._pending

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued report was delivered or given up; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    async def _deliver(self, target: EventTarget, bodies: list[bytes], token: str | None) -> None:
        try:
            for body in bodies:
                if not await self._deliver_one(target, body, token):
                    return
        finally:
            self._done()

    async def _deliver_one(self, target: EventTarget, body: bytes, token: str | None) -> bool:
        """Send one report until the app server answers 200 or the retries run out; False
        when the token died (reports need a live token: the rest is not sent either)."""
        request = post_request(target.url, body)
        for attempt in range(self._max_retries + 1):
            if token is not None and not self._state.session_alive(token):
                return False
            # Straight to the app server, never through a proxy; any status but 200 (or
            # no answer) means: send it again.
            if await post_once(target.url, request) == 200:
                with self._state.lock:
                    self._state.events_delivered += 1
                if token is not None:
                    self._state.touch(token)
                return True
            if attempt < self._max_retries:
                await asyncio.sleep(self._retry_interval)
        return True

    async def aclose(self) -> None:
        """Cancel undelivered reports and wait until their connections are closed (on the
        loop, before it stops: a delivery left pending would be torn down by the garbage
        collector after the loop is gone)."""
        with self._idle:
            self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with self._idle:
            self._pending = 0
            self._idle.notify_all()
