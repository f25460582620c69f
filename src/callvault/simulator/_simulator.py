"""The running simulator: a PbxState, its HTTP app on uvicorn in a background thread, events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from callvault.pbx import CallDetail, EventFormat
from callvault.simulator._app import build_app
from callvault.simulator._calls import draw_call
from callvault.simulator._clock import Clock
from callvault.simulator._config import SimulatorConfig
from callvault.simulator._events import (
    EventPusher,
    bootup_body,
    call_released_body,
    newcdr_body,
)
from callvault.simulator._faults import Faults
from callvault.simulator._progress import parties_of, progress_reports
from callvault.simulator._server import BackgroundServer, ServedPbx, StartupError
from callvault.simulator._state import PbxState, Recording
from callvault.simulator._tcp import TcpReportServer, check_tcp_settings
from callvault.simulator._tls import ServerCertificate, generate_certificate, server_ssl_context
from callvault.simulator._wav import write_wav

_SAFE_FILE_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$")
_TICK_SECONDS = 0.05
# "ANSWERD" is how the v2 documents spell it in places: still an answered (recorded) call.
_ANSWERED_SPELLINGS = frozenset({"ANSWERED", "ANSWERD"})
# Statuses of place_random_call and their weights: four in five calls are answered.
# Caller-ID names for the names_non_ascii fault: Latin-1 letters and one beyond it.
_NON_ASCII_CALLERS = ("Müller", "Groß", "Åström", "Çelik", "Łukasz")
CallListener = Callable[[CallDetail], None]


class Simulator(ServedPbx[SimulatorConfig]):
    """A Yeastar S-Series PBX on 127.0.0.1, for demos, tests and benchmarks.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The server runs on its
    own event loop in a background thread; every method here may be called from any thread.
    """

    def __init__(
        self, config: SimulatorConfig | None = None, *, clock: Clock | None = None
    ) -> None:
        self.config = config if config is not None else SimulatorConfig()
        check_tcp_settings(
            self.config.report_transport, self.config.tcp_login_answer, self.config.tcp_framing
        )
        self.clock = clock if clock is not None else Clock()
        self.password = self.config.password or secrets.token_urlsafe(12)
        self._tz = ZoneInfo(self.config.timezone)
        self._own_data_dir = self.config.data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="callvault-sim-"))
            if self.config.data_dir is None
            else Path(self.config.data_dir)
        )
        self.recordings_dir = self.data_dir / "recordings"
        self.recordings_dir.mkdir(parents=True, exist_ok=True)
        self.state = PbxState(
            username=self.config.username,
            password=self.password,
            serial=self.config.serial,
            clock=self.clock,
            faults=self.config.faults,
            recordings_dir=self.recordings_dir,
            seed=self.config.seed,
            invalidate_previous_tokens_on_login=self.config.invalidate_previous_tokens_on_login,
            refresh_tokens=self.config.kind == "cloud",
            report_transport=self.config.report_transport,
        )
        self._certificate: ServerCertificate | None = None
        self._server: BackgroundServer | None = None
        self._pusher: EventPusher | None = None
        self._tcp: TcpReportServer | None = None  # the TCP report port (report_transport tcp)
        self._port = 0
        self._listeners: list[CallListener] = []
        self._ticks = 0
        self._ticked = threading.Condition()

    def __repr__(self) -> str:
        return f"Simulator(url={self.url!r}, serial={self.serial!r})"

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> Simulator:
        """Bind the port, generate the certificate, serve in the background; returns self."""
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        cfg = self.config
        server = BackgroundServer(cfg.host, cfg.port)
        self._port = server.port
        context = None
        if cfg.tls or (cfg.report_transport == "tcp" and cfg.tcp_report_tls):
            self._certificate = generate_certificate(self.data_dir / "tls", cfg.host, cfg.serial)
        if cfg.tls and self._certificate is not None:
            context = server_ssl_context(self._certificate, legacy_tls=cfg.legacy_tls)
        if cfg.report_transport == "tcp":
            tcp_context = None
            if cfg.tcp_report_tls and self._certificate is not None:
                tcp_context = server_ssl_context(self._certificate, legacy_tls=cfg.legacy_tls)
            self._tcp = TcpReportServer(
                self.state,
                host=cfg.host,
                port=cfg.tcp_report_port,
                login_answer=cfg.tcp_login_answer,
                framing=cfg.tcp_framing,
                ssl_context=tcp_context,
            )
        self._server = server
        try:
            server.start(
                build_app(self.state),
                log_level=cfg.log_level,
                thread_name="callvault-simulator",
                ssl_context=context,
                serving=self._serving,
            )
        except StartupError:
            self.stop()
            raise
        return self

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """On the server's loop, around serving: the event pusher and the background duties."""
        self._pusher = EventPusher(
            self.state,
            asyncio.get_running_loop(),
            retry_interval=self.config.event_retry_interval,
            max_retries=self.config.event_max_retries,
        )
        if self._tcp is not None:
            await self._tcp.serve()
        ticker = asyncio.create_task(self._tick())
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await self._pusher.aclose()
            if self._tcp is not None:
                await self._tcp.aclose()

    def stop(self) -> None:
        """Stop serving, cancel undelivered reports, remove the temporary data directory."""
        if self._server is not None:
            self._server.stop()
        self._server = None
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- what a client needs to know ------------------------------------------------------------

    @property
    def username(self) -> str:
        return self.config.username

    @property
    def tcp_report_port(self) -> int:
        """The TCP report port (``report_transport="tcp"``); 0 when there is none."""
        return self._tcp.port if self._tcp is not None else 0

    @property
    def tcp_connections(self) -> int:
        """How many app servers are logged in on the TCP report port now."""
        return self._tcp.connection_count if self._tcp is not None else 0

    @property
    def tcp_login_count(self) -> int:
        """Successful logins on the TCP report port (failures: ``failed_login_count``)."""
        with self.state.lock:
            return self.state.tcp_login_count

    @property
    def tcp_reports_sent(self) -> int:
        """Reports written to TCP report connections (one per connection written to)."""
        return self._tcp.reports_sent if self._tcp is not None else 0

    @property
    def tcp_reports_dropped(self) -> int:
        """Reports not sent over TCP because no app server was connected (none are kept)."""
        return self._tcp.reports_dropped if self._tcp is not None else 0

    @property
    def tcp_login_blocks(self) -> list[dict[str, str]]:
        """Every login block received on the TCP report port (keys lowercased, the secret
        masked), in order."""
        return list(self._tcp.login_blocks) if self._tcp is not None else []

    def wait_tcp_connections(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until at least `count` app servers are logged in on the TCP report port."""
        deadline = time.monotonic() + timeout
        while self.tcp_connections < count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def events_delivered(self) -> int:
        with self.state.lock:
            return self.state.events_delivered

    @property
    def events_queued(self) -> int:
        """How many reports were queued for delivery (each counted once, resends not)."""
        with self.state.lock:
            return self.state.events_queued

    @property
    def login_count(self) -> int:
        with self.state.lock:
            return self.state.login_count

    @property
    def request_log(self) -> list[tuple[str, str]]:
        """(endpoint, errno or "Success" or "dropped" or "HTTP 5xx/404") per API request."""
        with self.state.lock:
            return list(self.state.request_log)

    @property
    def request_sources(self) -> list[tuple[str, str, str]]:
        """Every API request answered, in order, as (client IP, endpoint, outcome)."""
        with self.state.lock:
            return list(self.state.request_sources)

    @property
    def request_paths(self) -> list[str]:
        """The URL path (without the query) of every API request, in order of arrival."""
        with self.state.lock:
            return list(self.state.request_paths)

    def failed_login_count(self, ip: str = "127.0.0.1") -> int:
        return self.state.failed_login_count(ip)

    # -- calls and recordings -------------------------------------------------------------------

    def add_call_listener(self, listener: CallListener) -> None:
        """Call `listener(cdr)` after every placed call (from the thread that placed it)."""
        self._listeners.append(listener)

    def _local(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, self._tz)

    def place_call(
        self,
        callfrom: str = "1001",
        callto: str = "1003",
        type: str = "Internal",
        talk_seconds: float = 3,
        ring_seconds: float = 2,
        status: str = "ANSWERED",
        recorded: bool = True,
        didnumber: str = "",
        srctrunkname: str = "",
        dsttrunkname: str = "",
        size_bytes: int | None = None,
    ) -> CallDetail:
        """A call that has just ended: WAV on disk, CDR stored, its progress reports (unless
        switched off, see SimulatorConfig.call_progress_reports) and NewCdr pushed to the
        app servers, in this order.

        `status` is stored and pushed as given; only an answered call (``ANSWERED``, or the
        documents' ``ANSWERD``) has talk time and a recording.
        """
        answered = status.strip().upper() in _ANSWERED_SPELLINGS
        talk = int(talk_seconds) if answered else 0
        ring = int(ring_seconds)
        hangup = self.clock.now()
        start = hangup - ring - talk
        callid = self.state.next_callid(start)
        # An outbound call's trunk leg has an id of its own, the next one (V1 examples:
        # callid 1547396927.428, outboundid 1547396927.429).
        leg_id = self.state.next_callid(start) if type.strip().lower() == "outbound" else ""
        name: str | None = None
        if recorded and answered:
            stamp = self._local(start + ring).strftime("%Y%m%d%H%M%S")
            # .yswav: the Cloud PBX's names before firmware 81.9.0.14 (the body is a WAV).
            extension = ".yswav" if self.state.faults.yswav_names else ".wav"
            name = f"{stamp}-{callid}-{callfrom}-{callto}-{type}{extension}"
            file_name = name if _SAFE_FILE_NAME.match(name) else f"{callid}{extension}"
            path = self.recordings_dir / file_name
            with self.state.lock:
                frequency = 300.0 + 20 * self.state.rng.randrange(20)
            size, sha256 = write_wav(
                path,
                seconds=talk,
                total_size=size_bytes,
                frequency=frequency,
                marker=hashlib.sha256(name.encode()).digest(),
            )
            self.state.add_recording(
                Recording(name=name, path=path, size=size, sha256=sha256, created_at=hangup)
            )
        cdr = CallDetail(
            callid=callid,
            timestart=self._local(start).strftime("%Y-%m-%d %H:%M:%S"),
            callfrom=callfrom,
            callto=callto,
            callduration=ring + talk,
            talkduration=talk,
            srctrunkname=srctrunkname,
            dsttrunkname=dsttrunkname,
            status=status,
            type=type,
            pincode="",
            recording=name,
            didnumber=didnumber,
            agentringtime=0,
            sn=self.config.serial,
        )
        self.state.add_cdr(cdr)
        if self._pusher is not None:
            targets = self.state.live_targets()
            tcp = self._tcp is not None
            odd = (
                tcp or any(t.format is EventFormat.V2_0_0 for _token, t in targets)
            ) and self.state.chance(self.faults.v2_spellings_rate)
            parties = None
            if self.config.call_progress_reports and (targets or tcp):
                parties = parties_of(
                    cdr, outbound_leg_id=leg_id, next_channel=self.state.next_channel
                )
            for token, target in targets:
                reports = []
                if parties is not None:
                    reports = progress_reports(cdr, parties, target.format, self.serial)
                reports.append(newcdr_body(cdr, target.format, odd_spellings=odd))
                self._pusher.push_all(target, reports, token)
            if self._tcp is not None:  # format 2.0.0, to the app servers connected now
                reports = []
                if parties is not None:
                    reports = progress_reports(cdr, parties, EventFormat.V2_0_0, self.serial)
                reports.append(newcdr_body(cdr, EventFormat.V2_0_0, odd_spellings=odd))
                self._tcp.send(reports)
        if name is not None and self.state.chance(self.faults.delete_rate):
            self.state.delete_recording(name)
        for listener in list(self._listeners):
            listener(cdr)
        return cdr

    def place_random_call(self, *, answered: bool | None = None) -> CallDetail:
        """A plausible call: internal, inbound from a mobile, or outbound; some unanswered.

        `answered` True forces an answered (recorded) call, False an unanswered one.
        """
        with self.state.lock:
            drawn = draw_call(self.state.rng, answered=answered)
        kind, ext, other = drawn.call_type, drawn.extension, drawn.other
        talk, ring, status = drawn.talk_seconds, drawn.ring_seconds, drawn.status
        mobile = drawn.mobile
        mobile = self._as_dialled(mobile)
        if kind == "Internal":
            return self.place_call(
                callfrom=ext,
                callto=other,
                type=kind,
                talk_seconds=talk,
                ring_seconds=ring,
                status=status,
            )
        if kind == "Inbound":
            return self.place_call(
                callfrom=mobile,
                callto=ext,
                type=kind,
                talk_seconds=talk,
                ring_seconds=ring,
                status=status,
                didnumber="+49301234567" if self.faults.names_with_plus else "0301234567",
                srctrunkname="SIP-Provider",
            )
        return self.place_call(
            callfrom=ext,
            callto=mobile,
            type=kind,
            talk_seconds=talk,
            ring_seconds=ring,
            status=status,
            dsttrunkname="SIP-Provider",
        )

    def _as_dialled(self, national: str) -> str:
        """An external number (national format, digits only) as the trunk delivers it: digits
        only, unless a names_* fault asks for a ``+``, a space or a non-ASCII caller ID."""
        faults = self.faults
        if faults.names_non_ascii:
            with self.state.lock:
                return self.state.rng.choice(_NON_ASCII_CALLERS)
        number = f"+49{national[1:]}" if faults.names_with_plus else national
        if faults.names_with_spaces:
            number = f"{number[:-8]} {number[-8:]}"
        return number

    def push_call_released(self, callid: str, extensions: list[str]) -> None:
        """Push a BYE report naming several parties (the legacy format repeats its keys)."""
        if self._pusher is None:
            return
        for token, target in self.state.live_targets():
            body = call_released_body(callid, extensions, self.serial, target.format)
            self._pusher.push(target, body, token)
        if self._tcp is not None:
            self._tcp.send(
                [call_released_body(callid, extensions, self.serial, EventFormat.V2_0_0)]
            )

    def _recording(self, name: str) -> Recording:
        recording = self.state.recording(name)
        if recording is None:
            raise KeyError(name)
        return recording

    def recording_path(self, name: str) -> Path:
        return self._recording(name).path

    def recording_sha256(self, name: str) -> str:
        return self._recording(name).sha256

    def recording_names(self) -> list[str]:
        """Names of the recordings present (not deleted), oldest first."""
        return self.state.recording_names()

    def delete_recording(self, name: str) -> None:
        self.state.delete_recording(name)

    # -- faults ---------------------------------------------------------------------------------

    def revoke_tokens(self) -> None:
        """The PBX forgets every token (20004 afterwards); no report is sent."""
        self.state.revoke_tokens()

    def reboot(self) -> None:
        """All tokens and randoms lost; BootUp pushed (over HTTP) to every app server that was
        logged in; every TCP report connection is closed (no BootUp over TCP)."""
        targets = self.state.reboot()
        if self._tcp is not None:  # the restart ends every report connection
            self._tcp.drop_all()
        if self._pusher is not None:
            for target in targets:
                self._pusher.push(target, bootup_body(self.serial, target.format), None)

    def wait_events_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued report was delivered (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        if self._pusher is not None and not self._pusher.wait_idle(timeout):
            return False
        if self._tcp is not None:
            return self._tcp.wait_idle(max(deadline - time.monotonic(), 0.0))
        return True

    @property
    def tick_count(self) -> int:
        """How many rounds of background duties (periodic faults, random calls) have run."""
        with self._ticked:
            return self._ticks

    def wait_ticks(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until `count` more rounds of background duties have run; False on timeout.

        After a fault switch is changed, two rounds guarantee the change was seen.
        """
        with self._ticked:
            target = self._ticks + count
            return self._ticked.wait_for(lambda: self._ticks >= target, timeout)

    async def _tick(self) -> None:
        """Background duties on the simulator clock: periodic faults and random calls.

        A periodic fault's interval is counted from when it was switched on (or its interval
        changed), never from when the simulator started: switched on mid-run, after the
        clock was moved on, it does not fire at once.
        """
        last_revoke = last_reboot = self.clock.now()
        revoke_every = self.faults.revoke_every_seconds
        reboot_every = self.faults.reboot_every_seconds
        next_call: float | None = None
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            with self._ticked:
                self._ticks += 1
                self._ticked.notify_all()
            now = self.clock.now()
            faults = self.faults
            if faults.revoke_every_seconds != revoke_every:
                revoke_every, last_revoke = faults.revoke_every_seconds, now
            if faults.reboot_every_seconds != reboot_every:
                reboot_every, last_reboot = faults.reboot_every_seconds, now
            if revoke_every > 0 and now - last_revoke >= revoke_every:
                last_revoke = now
                self.revoke_tokens()
            if reboot_every > 0 and now - last_reboot >= reboot_every:
                last_reboot = now
                self.reboot()
            rate = self.config.calls_per_minute
            if rate <= 0:
                next_call = None
                continue
            if next_call is None:
                with self.state.lock:
                    next_call = now + self.state.rng.expovariate(rate / 60.0)
            if now >= next_call:
                with self.state.lock:
                    next_call = now + self.state.rng.expovariate(rate / 60.0)
                await asyncio.to_thread(self.place_random_call)


def replace_config(config: SimulatorConfig, **changes: Any) -> SimulatorConfig:
    """A copy of `config` with some fields changed (faults copied too)."""
    return dataclasses.replace(config, faults=dataclasses.replace(config.faults), **changes)
