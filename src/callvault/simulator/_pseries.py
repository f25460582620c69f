"""A faithful Yeastar P-Series (OpenAPI) PBX on 127.0.0.1, for the P-Series client's tests.

It speaks the P-Series OpenAPI as the vendor's developer guides describe it ("ref N.N"
below are the sections of the project's protocol notes on it, which docs/pbx-kinds.md and
docs/simulator.md summarise) over HTTPS (or HTTP) and WSS (or WS) on one port. It shares
only the S-Series simulator's building blocks (:class:`Clock`, the self-signed
certificate, WAV writing) and nothing with the client.

What is modelled
----------------
* Tokens (ref 2): ``POST /openapi/v1.0/get_token`` with Client ID/Secret in clear (bad
  ones: ``-1 FAILURE`` + ``invalid_param_list``; a missing field or a non-JSON body: 40002
  / 40001, not counted as a failed authentication), ``POST refresh_token`` (both tokens
  rotate; the used refresh token dies; an unknown, used or expired one answers 10004),
  ``GET del_token`` (also drops the refresh token issued with it); tokens are 32
  characters [A-Za-z0-9]; access 30 min and refresh 24 h on the simulator clock (fixed,
  not sliding); the token only as ``?access_token=`` (a Bearer header is ignored: 10004).
* Lockout and IP rules (ref 2.6): 5 consecutive failed ``get_token`` from one IP block that
  IP for every request (70004); ``ip_allow`` (70087); app permissions (10005).
* Envelope and errors (ref 1.3, 1.4): HTTP 200 + JSON with an integer ``errcode`` for every
  API error; unknown endpoint 10001, unknown version 10003; missing ``User-Agent`` 40002;
  every response ``Connection: close``.
* Recordings (ref 3): ``recording/list|search|download``, the file GET under
  ``/api/download/`` (and ``/api/downloadattachment/`` for async mode), streamed from disk
  with ``Content-Length``; WAV (8 kHz 16-bit PCM) or an MP3-looking file (ID3v2 tag and
  silent MPEG-1 Layer III frames). Names ``{answer local}-{call_id}-{from}-{to}-{Type}.ext``.
  The file GET answers ``audio/wav`` or ``audio/mpeg`` with ``Content-Length`` and
  ``Content-Disposition: attachment; filename="..."``. A recording's list ``time`` is
  the call start in the display format.
* CDR (ref 4.1, 4.2): ``cdr/list|search`` with paging (default and maximum page_size
  10,000), sorting, and time filters in the display format (a mismatch matches nothing,
  not an error) or Unix seconds.
* Events (ref 5): WebSocket ``/openapi/v1.0/subscribe`` (topic_list, heartbeat, idle close);
  30011 (RING/ANSWER/BYE) and 30012 per call, 30033 in async mode; webhooks signed with
  ``X-Signature``, retried on failure. Events are not queued for absent sockets.

Switches for the reference's unknowns
-------------------------------------
* ``token_policy`` (ref 2.5): ``cap8`` (8 live access tokens per app, then ``get_token``
  answers 60002) or ``invalidate_previous`` (each ``get_token`` kills the app's older
  tokens). ``refresh_token`` is not subject to the cap.
* ``refresh_invalidates_old_access`` (ref 2.3): whether the access token issued with a
  refresh token dies when that refresh token is used (default: it lives on).
* ``lockout_s`` (ref 2.6): None = blocked until :meth:`PSeriesSimulator.unblock`; else
  seconds on the simulator clock. While blocked every request answers 70004.
* ``display_format`` / ``unix_time_filters`` (ref 4.3).
* ``download_format="mp3"`` (ref 3.3): only one file GET at a time; while one streams, a
  second file GET *and* any ``recording/download`` answer 70082 OVERLOAD_TASK_RUNNING.
* ``async_downloads`` (ref 3.5): the trigger is unknown, so it is a PBX-wide switch:
  ``recording/download`` answers ``{"errcode":2,"errmsg":"PROCESSING","file":...}`` and
  ``async_delay_s`` later event 30033 (``msg`` an object) carries
  ``/api/downloadattachment/...``.
* ``single_use_urls`` (ref 3.4): a download URL works once (default: any number of times
  within its 30 minutes). Range requests are not supported (the full body is always sent).
* ``expired_url_answer`` (ref 3.4): an unknown, expired, used-up or deleted URL answers
  ``html404`` (HTTP 404 text/html, default) or ``json10004`` (HTTP 200 JSON 10004). A bad
  or expired *token* on the file GET always answers JSON 10004 with HTTP 200.
* ``require_user_agent`` (ref 1.2): on the API only; the file GET and WebSocket handshake
  do not require one.
* ``ws_idle_timeout_s``, ``close_ws_on_token_expiry`` (ref 5.2): idle counted in real
  seconds from the client's last text frame; a new ``topic_list`` replaces the old one.
* ``msg_as_object`` (ref 5.1): 30011/30012 ``msg`` as an object instead of a JSON string;
  WebSocket and webhooks carry the same bytes.
* Webhooks (ref 5.3): retries ``webhook_retries`` times every
  ``webhook_retry_interval_s`` on non-2xx or no answer (5 s timeout); ``User-Agent:
  OpenAPI``; the target's certificate is not checked; a GET webhook carries the event as
  its body, or with ``webhook_get_payload="query"`` as query parameter ``body``.
* Lockout counting (ref 2.6): only ``get_token`` with wrong credentials counts (the
  fifth still answers -1, the block starts after it); a successful one resets the count;
  a restart keeps the blocklist.
* 30012 fields (ref 5.4): ``time_start`` is fixed ``YYYY-MM-DD HH:MM:SS`` local time,
  ``status``/``type`` exactly as given to :meth:`PSeriesSimulator.place_call`, ``" "`` for
  empty strings, and the newer ``uid``, ``did_name``, ``call_note_id``, ``enb_call_note``.
* Undocumented paging (ref 3.1): recording/list default page_size
  ``recording_page_size`` (20), maximum 10,000; default sort ``id``, order ``asc``.
* Faults: :class:`PSeriesFaults`. The config is read per request too, so a test may
  change e.g. ``sim.config.display_format`` mid-run (the checklist's format change).

Not modelled
------------
``cdr/download`` and the CDR CSV, ``/openapi/v2.0`` endpoints (10001), other events than
30011/30012/30033, Range requests, stereo recordings, the web portal, several apps (one
Client ID), the 5-webhook limit, HTTP keep-alive (every answer closes the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import shutil
import string
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from callvault.simulator._calls import draw_call
from callvault.simulator._clock import Clock
from callvault.simulator._pseries_app import PSeriesHttp, build_app
from callvault.simulator._pseries_events import EventHub, event_body
from callvault.simulator._pseries_state import (
    PSeriesState,
    Recording,
    write_mp3,
)
from callvault.simulator._pseries_types import (
    DOWNLOAD_FORMATS,
    EDITIONS,
    EXPIRED_URL_ANSWERS,
    TOKEN_POLICIES,
    WEBHOOK_GET_PAYLOADS,
    PSeriesCall,
    PSeriesConfig,
    PSeriesFaults,
)
from callvault.simulator._server import BackgroundServer, ServedPbx, StartupError
from callvault.simulator._tls import ServerCertificate, generate_certificate, server_ssl_context
from callvault.simulator._wav import write_wav

_ANSWERED = frozenset({"ANSWERED", "ANSWERD"})
_SECRET_ALPHABET = string.ascii_letters + string.digits


def _blank(value: str) -> str:
    """The PBX's placeholder for an empty string in event messages (ref 5.4)."""
    return value if value else " "


def _validate(config: PSeriesConfig) -> None:
    checks = [
        ("edition", config.edition, EDITIONS),
        ("token_policy", config.token_policy, TOKEN_POLICIES),
        ("download_format", config.download_format, DOWNLOAD_FORMATS),
        ("expired_url_answer", config.expired_url_answer, EXPIRED_URL_ANSWERS),
        ("webhook_get_payload", config.webhook_get_payload, WEBHOOK_GET_PAYLOADS),
    ]
    for name, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    for hook in config.webhooks:
        if hook.method.upper() not in ("GET", "POST"):
            raise ValueError(f"webhook method must be GET or POST, not {hook.method!r}")


class PSeriesSimulator(ServedPbx[PSeriesConfig]):
    """A Yeastar P-Series PBX (OpenAPI) on 127.0.0.1; see the module docstring.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The server runs on its
    own event loop in a background thread; every method may be called from any thread.
    """

    def __init__(self, config: PSeriesConfig | None = None, *, clock: Clock | None = None) -> None:
        self.config = config if config is not None else PSeriesConfig()
        _validate(self.config)
        self.clock = clock if clock is not None else Clock()
        self.client_secret = self.config.client_secret or "".join(
            secrets.choice(_SECRET_ALPHABET) for _ in range(32)
        )
        self._own_data_dir = self.config.data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="callvault-psim-"))
            if self.config.data_dir is None
            else Path(self.config.data_dir)
        )
        self.recordings_dir = self.data_dir / "recordings"
        self.recordings_dir.mkdir(parents=True, exist_ok=True)
        self.state = PSeriesState(
            config=self.config,
            client_secret=self.client_secret,
            clock=self.clock,
            recordings_dir=self.recordings_dir,
        )
        self._hub: EventHub | None = None
        self._new_cdrs: dict[str, dict[str, Any]] = {}  # the 30012 sent, by recording
        self._http = PSeriesHttp(self.state, lambda: self._hub)
        self._certificate: ServerCertificate | None = None
        self._server: BackgroundServer | None = None
        self._port = 0
        self._channel = 0

    def __repr__(self) -> str:
        return f"PSeriesSimulator(url={self.url!r}, serial={self.serial!r})"

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> PSeriesSimulator:
        """Bind the port, generate the certificate, serve in the background; returns self."""
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        cfg = self.config
        server = BackgroundServer(cfg.host, cfg.port)
        self._port = server.port
        context = None
        if cfg.tls:
            self._certificate = generate_certificate(self.data_dir / "tls", cfg.host, cfg.serial)
            context = server_ssl_context(self._certificate)
        self._server = server
        try:
            server.start(
                build_app(self._http),
                log_level=cfg.log_level,
                thread_name="callvault-pseries-simulator",
                ssl_context=context,
                serving=self._serving,
                ws="websockets-sansio",
                ws_ping_interval=None,
            )
        except StartupError:
            self.stop()
            raise
        return self

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """On the server's loop, around serving: the event hub (WebSockets and webhooks)."""
        self._hub = EventHub(self.state, asyncio.get_running_loop())
        try:
            yield
        finally:
            await self._hub.aclose()

    def stop(self) -> None:
        """Stop serving, drop undelivered webhooks, remove the temporary data directory."""
        if self._hub is not None:
            self._hub.close_all_threadsafe()
        if self._server is not None:
            self._server.stop()
        self._server = None
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- what a client needs to know ------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.config.client_id

    @property
    def firmware(self) -> str:
        return self.state.firmware

    @property
    def faults(self) -> PSeriesFaults:
        return self.config.faults

    @property
    def get_token_count(self) -> int:
        with self.state.lock:
            return self.state.get_token_count

    @property
    def ws_connections(self) -> int:
        hub = self._hub
        return len(hub.sessions) if hub is not None else 0

    def resend_new_cdr(self, file: str, times: int = 1) -> None:
        """Send the 30012 of the call recorded as `file` again, `times` times, to the
        WebSockets and webhooks, as a PBX that repeats itself would."""
        for _ in range(times):
            self._emit(30012, self._new_cdrs[file])

    def ws_subscribers(self, topic: int) -> int:
        """How many open WebSockets have subscribed to `topic` (e.g. 30012): a socket is
        open a moment before its topic list arrives, and an event sent in between is not
        sent to it."""
        hub = self._hub
        return sum(1 for s in list(hub.sessions) if topic in s.topics) if hub is not None else 0

    def mute_websockets(self) -> None:
        """The WebSockets open now get no more events (they stay open and answer the
        heartbeat), as if their subscription had lapsed: events then go to the webhooks
        only."""
        hub = self._hub
        for session in list(hub.sessions) if hub is not None else []:
            session.topics = frozenset()

    @property
    def request_log(self) -> list[tuple[str, str]]:
        """(path without query, outcome) per request: errcode as text ("0" success), "HTTP
        502", "HTTP 404", "dropped", "gone" (unknown/expired URL), "101" (WebSocket)."""
        with self.state.lock:
            return list(self.state.request_log)

    @property
    def webhook_deliveries(self) -> list[tuple[str, int, int]]:
        """(url, event type, HTTP status or 0) per webhook attempt."""
        hub = self._hub
        if hub is None:
            return []
        with self.state.lock:
            return list(hub.deliveries)

    def live_tokens(self) -> int:
        return self.state.live_tokens(self.config.client_id)

    def restart(self) -> None:
        """A PBX restart: every token, download URL and WebSocket is gone."""
        self.state.restart()
        if self._hub is not None:
            self._hub.close_all_threadsafe()

    def unblock(self, ip: str = "127.0.0.1") -> None:
        """Remove `ip` from the blocklist (Security > Blocked IPs), failures forgotten."""
        self.state.unblock(ip)

    def wait_events_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every webhook delivery finished (delivered or given up)."""
        return self._hub.wait_idle(timeout) if self._hub is not None else True

    # -- calls and recordings -------------------------------------------------------------------

    def place_random_call(self, *, answered: bool | None = None) -> PSeriesCall:
        """A plausible call: internal, inbound from a mobile, or outbound; some unanswered
        (no recording). `answered` True forces an answered (recorded) call, False an
        unanswered one. The same draw as the S-Series simulator's."""
        with self.state.lock:
            drawn = draw_call(self.state.rng, answered=answered)
        call_from, call_to = drawn.parties()
        inbound = drawn.call_type == "Inbound"
        return self.place_call(
            call_from=call_from,
            call_to=call_to,
            call_type=drawn.call_type,
            status=drawn.status,
            talk_seconds=drawn.talk_seconds,
            ring_seconds=drawn.ring_seconds,
            did_number="0301234567" if inbound else "",
            src_trunk="SIP-Provider" if inbound else "",
            dst_trunk="SIP-Provider" if drawn.call_type == "Outbound" else "",
        )

    def place_call(
        self,
        *,
        call_from: str = "1001",
        call_to: str = "1003",
        talk_seconds: int = 3,
        call_type: str = "Internal",
        status: str = "ANSWERED",
        size_bytes: int | None = None,
        record: bool = True,
        ring_seconds: int = 2,
        from_name: str = "",
        to_name: str = "",
        did_number: str = "",
        src_trunk: str = "",
        dst_trunk: str = "",
    ) -> PSeriesCall:
        """A call that has just ended (on the simulator clock): recording on disk, CDR and
        recording rows stored, 30011 events (unless switched off) and 30012 emitted.

        Only an answered call (``ANSWERED`` or the documents' ``ANSWERD``) has talk time
        and, with `record`, a recording. `size_bytes` makes the file exactly that big.
        """
        state = self.state
        answered = status.strip().upper() in _ANSWERED
        talk = int(talk_seconds) if answered else 0
        ring = int(ring_seconds)
        end = self.clock.now()
        start = float(int(end - ring - talk))
        call_id = state.next_call_id(start)
        uid = state.next_uid(start)
        recording: Recording | None = None
        if record and answered:
            ext = ".mp3" if self.config.download_format == "mp3" else ".wav"
            stamp = state.local(start + ring).strftime("%Y%m%d%H%M%S")
            name = f"{stamp}-{call_id}-{call_from}-{call_to}-{call_type}{ext}"
            rec_id = state.new_recording_id()
            path = self.recordings_dir / f"{rec_id}{ext}"
            marker = hashlib.sha256(f"{self.serial}/{name}".encode()).digest()
            if ext == ".mp3":
                size, sha256 = write_mp3(path, seconds=talk, total_size=size_bytes, marker=marker)
            else:
                size, sha256 = write_wav(
                    path,
                    seconds=talk,
                    total_size=size_bytes,
                    frequency=300.0 + 20 * (rec_id % 20),
                    marker=marker,
                )
            recording = Recording(
                id=rec_id,
                cdr_id=0,
                call_id=call_id,
                uid=uid,
                file=name,
                path=path,
                size=size,
                sha256=sha256,
                start=start,
                duration=ring + talk,
                call_from=call_from,
                call_to=call_to,
                from_name=from_name,
                to_name=to_name,
                call_type=call_type,
                emitted_at=self.clock.now(),
            )
        cdr = state.add_cdr(
            call_id=call_id,
            uid=uid,
            start=start,
            call_from=call_from,
            call_to=call_to,
            from_name=from_name,
            to_name=to_name,
            duration=ring + talk,
            ring_duration=ring,
            talk_duration=talk,
            disposition=status,
            call_type=call_type,
            src_trunk=src_trunk,
            dst_trunk=dst_trunk,
            did_number=did_number,
            record_file=recording.file if recording is not None else "",
        )
        if recording is not None:
            recording.cdr_id = cdr.id
            state.add_recording(recording)
        call = PSeriesCall(
            id=recording.id if recording is not None else 0,
            cdr_id=cdr.id,
            call_id=call_id,
            uid=uid,
            time_start=state.local(start).strftime("%Y-%m-%d %H:%M:%S"),
            timestamp=int(start),
            call_from=call_from,
            call_to=call_to,
            call_duration=ring + talk,
            talk_duration=talk,
            status=status,
            type=call_type,
            file=recording.file if recording is not None else None,
        )
        if self.config.call_status_events:
            for msg in self._status_events(call, answered, src_trunk or dst_trunk):
                self._emit(30011, msg)
        new_cdr = self._new_cdr_msg(call, src_trunk, dst_trunk, did_number)
        if call.file is not None:
            self._new_cdrs[call.file] = new_cdr
        self._emit(30012, new_cdr)
        return call

    def _emit(self, event_type: int, msg: dict[str, Any]) -> None:
        if self._hub is None:
            return
        body = event_body(event_type, self.serial, msg, as_object=self.config.msg_as_object)
        self._hub.emit(event_type, body)

    def _new_cdr_msg(
        self, call: PSeriesCall, src_trunk: str, dst_trunk: str, did_number: str
    ) -> dict[str, Any]:
        """30012 New CDR (ref 5.4), snake_case, ``" "`` for empty strings."""
        return {
            "call_id": call.call_id,
            "time_start": call.time_start,
            "call_from": call.call_from,
            "call_to": call.call_to,
            "call_duration": call.call_duration,
            "talk_duration": call.talk_duration,
            "src_trunk_name": _blank(src_trunk),
            "dst_trunk_name": _blank(dst_trunk),
            "pin_code": " ",
            "status": call.status,
            "type": call.type,
            "recording": _blank(call.file or ""),
            "did_number": _blank(did_number),
            "agent_ring_time": 0,
            "did_name": " ",
            "uid": call.uid,
            "call_note_id": 0,
            "enb_call_note": 0,
        }

    def _status_events(self, call: PSeriesCall, answered: bool, trunk: str) -> list[dict[str, Any]]:
        """30011 Call Status Changed (ref 5.5): ringing, answered (if so), hung up."""
        with self.state.lock:
            self._channel += 2
            first = self._channel - 1
        caller_channel = f"PJSIP/{call.call_from}-{first:08x}"
        callee_channel = f"PJSIP/{call.call_to}-{first + 1:08x}"
        kind = call.type.strip().lower()

        def member(number: str, channel: str, status: str, *, side: str) -> dict[str, Any]:
            if kind in ("inbound", "outbound") and side == ("from" if kind == "inbound" else "to"):
                return {
                    kind: {
                        "from": call.call_from,
                        "to": call.call_to,
                        "trunk_name": _blank(trunk),
                        "channel_id": channel,
                        "member_status": status,
                        "call_path": "",
                    }
                }
            return {
                "extension": {
                    "number": number,
                    "channel_id": channel,
                    "member_status": status,
                    "call_path": "",
                }
            }

        phases = [("ALERT", "RING")]
        if answered:
            phases.append(("ANSWERED", "ANSWER"))
        phases.append(("BYE", "BYE"))
        return [
            {
                "call_id": call.call_id,
                "members": [
                    member(call.call_from, caller_channel, caller, side="from"),
                    member(call.call_to, callee_channel, callee, side="to"),
                ],
            }
            for caller, callee in phases
        ]

    def recording_sha256(self, file: str) -> str:
        return self.state.by_file(file).sha256

    def recording_path(self, file: str) -> Path:
        return self.state.by_file(file).path

    def recording_names(self) -> list[str]:
        """Names of the recordings present (not deleted), oldest first."""
        with self.state.lock:
            return [r.file for r in self.state.recordings.values() if not r.deleted]

    def delete_recording(self, file: str) -> None:
        self.state.delete_recording(file)
