"""The archiver service assembled: receiver + session + workers + reconciliation.

`Archiver(config).run(stop)` is the whole of `callvault serve` as a coroutine; the
`start()`/`stop()` pair (or `with Archiver(config) as archiver:`) runs it in a
background thread for the demo and for tests.

Each PBX it archives (`config.targets()`: the config's own, then `more_pbxs`) is a lane
(`_Lane`). Its intake, a report receiver and a group committer, runs for as long as the
service does: any node takes any PBX's reports and commits them to the index. Its work,
the API client and session, download workers and reconciliation, runs only while this
node holds the PBX's lease (`Ownership`, in `_ownership`): with several nodes on one
PostgreSQL index, each PBX is worked on by one node at a time, spread evenly, and taken
over within seconds when its node dies. One node alone holds every lease. The lanes share
the events listener (a report goes to the lane whose secret path it was posted to), the
index, the storage and the web app. On PostgreSQL a commit of new jobs wakes the owner's
workers through a notice (`index.notices`).

The downloads run as a registered process of kind "serve" on node `config.node` (default
the host name; see `Downloads`): a restart of the same node takes over the downloads its
predecessor held at once. The session and reconciliation tasks are supervised: one that
fails is logged at ERROR and started again. If the process is fenced (its registration was
ended by another process), it stops downloading at once, shuts down and `run` raises
`Fenced`.

Shutdown order (SIGTERM/SIGINT in the CLI, `stop()` in process): stop accepting events,
commit what was received, let in-flight downloads finish (or release them), mark the
process stopped, log out, release the leases (another node takes them at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx

from callvault.archive._alerts import Alerter, AlertSettings
from callvault.archive._backfill import BackfillStats, backfill, reconcile
from callvault.archive._commit import GroupCommitter
from callvault.archive._downloads import Downloads, PoolOptions
from callvault.archive._metrics import ArchiverMetrics, PbxFigures, ServiceProbe
from callvault.archive._ownership import (
    DEFAULT_LEASE_RENEW_S,
    DEFAULT_LEASE_TTL_S,
    Ownership,
)
from callvault.archive._policy import RetryPolicy
from callvault.archive._process import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_STALE_AFTER_S,
    Fenced,
    default_node,
)
from callvault.archive._receiver import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY,
    SourceAllowList,
    allow_list_for,
    create_receiver_app,
    new_secret_path,
    validate_cdr,
)
from callvault.archive._session import PbxSession, note_left_out, refused_login
from callvault.archive._tokens import IndexTokenStore
from callvault.archive._where import StorageMismatch, storage_url_for
from callvault.archive._workers import Archived, WorkerPool
from callvault.index import (
    BackfillRequest,
    Index,
    InvalidCallDetail,
    Lease,
    RecordResult,
    SettingKey,
    open_index,
)
from callvault.index.pbxs import MAX_DOWNLOADS_LIMIT, PbxRecord
from callvault.keys import Keyring
from callvault.pbx import (
    ApiVersion,
    AuthError,
    BootUpEvent,
    CallDetail,
    Event,
    EventsResumed,
    NewCdrEvent,
    PbxBusy,
    PbxClient,
    PbxError,
    PbxTransportError,
    PSeriesClient,
    SessionWithdrawn,
    TlsOptions,
    tcp_reports,
)
from callvault.serving import (
    DEFAULT_HEADER_TIMEOUT_S,
    Server,
    ServerThread,
    listen,
    server_for,
)
from callvault.storage import Storage, open_storage_url

log = logging.getLogger("callvault.archive")


# After the PBX refused the login of a TCP report connection: how long before the next
# (five refusals in a row lock the host out of the PBX).
_TCP_LOGIN_PAUSE_S = 900.0

# What a busy port most likely means for `serve`.
_ANOTHER_SERVE = "is another callvault serve running?"

# How long start-up waits for the first login attempt before saying it is ready.
_FIRST_LOGIN_WAIT_S = 5.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PbxTarget:
    """A PBX an archiver archives: how to reach it, and its registry entry by name
    (`registry_name`; None: the PBX of serve's flags, the registry's entry 0)."""

    pbx_url: str
    username: str
    password: str = field(repr=False)
    registry_name: str | None = None
    api_version: ApiVersion = ApiVersion.V1_1_0
    # Which API it speaks (`callvault.index.pbxs.KINDS`): s-series, cloud or p-series.
    kind: str = "s-series"
    # An S-Series v2 PBX whose Report Method is TCP: the port on it to take reports from.
    tcp_report_port: int | None = None
    tls: TlsOptions | None = None
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    workers: int = 2  # its download workers: a PBX is a small embedded box
    events_allow: Sequence[str] | None = None  # default: the PBX host's addresses
    # Its registry entry's settings and password, digested (`PbxRecord.revision`): a
    # target with another revision is the same PBX with other settings.
    revision: str | None = None


# What the registry says to archive now, by PBX name: its target, or why it cannot be
# archived (then a lane already running for it is left as it is).
RegistryView = Mapping[str, PbxTarget | str]


@dataclass(slots=True)
class ArchiverConfig:
    """Everything the service needs; the CLI builds it from `ArchiveSettings`.

    The PBX fields (`pbx_url` ... `events_allow`, `workers`, `timezone`) are the first PBX
    it archives; `more_pbxs` are the others, each with its own session, workers, secret
    report path and reconciliation, all reports arriving at the one events listener.
    """

    pbx_url: str
    username: str
    password: str = field(repr=False)
    archive: Path
    # Where the recordings are kept (file:///DIR, s3://BUCKET/PREFIX); None: `archive`.
    storage_url: str | None = None
    # A PBX of the registry (`callvault pbx add`), by name. None: the PBX these settings
    # give (the one-PBX shorthand of serve's flags), which becomes the registry's entry of
    # the archive's own PBX at start (`index.pbxs.given_at_start`).
    registry_name: str | None = None
    db_url: str | None = None  # default: sqlite file ARCHIVE/callvault.db
    api_version: ApiVersion = ApiVersion.V1_1_0
    # Which API it speaks (`callvault.index.pbxs.KINDS`): s-series, cloud or p-series.
    kind: str = "s-series"
    tcp_report_port: int | None = None  # see PbxTarget
    tls: TlsOptions | None = None
    events_host: str = "0.0.0.0"  # noqa: S104 - the PBX must reach it; guarded by path+source
    events_port: int = 8260
    events_allow: Sequence[str] | None = None  # default: the PBX host's addresses
    workers: int = 2
    # This machine's name among several sharing one index (default: the host name). A
    # restart of the same node takes over the downloads its predecessor held at once.
    node: str | None = None
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    reconcile_hours: float = 48.0
    reconcile_interval_s: float = 3600.0
    reconcile_at_start: bool = True
    heartbeat_interval_s: float = 600.0
    # Delays between login attempts while the PBX cannot be reached (not for bad passwords).
    login_retry_s: tuple[float, ...] = (2.0, 5.0, 15.0, 30.0, 60.0)
    job_lease_s: float = 300.0
    poll_interval_s: float = 5.0
    # The process row's heartbeat, and when another process's claims are taken as abandoned.
    process_heartbeat_s: float = DEFAULT_HEARTBEAT_S
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    max_event_body: int = DEFAULT_MAX_BODY
    # An event connection must send its headers, then its body, within these (seconds).
    event_header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    event_body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    shutdown_grace_s: float = 20.0
    web_host: str | None = None
    web_port: int | None = None
    # The address of a reverse proxy in front of the web app: its X-Forwarded-For and
    # X-Forwarded-Proto are believed, from that address only. None: no header is believed.
    web_trusted_proxy: str | None = None
    # Client tuning (tests shrink these): per-call attempts and backoff inside the client.
    client_max_attempts: int = 4
    client_backoff_base: float = 0.5
    client_backoff_max: float = 8.0
    client_timeout: float = 30.0
    more_pbxs: tuple[PbxTarget, ...] = ()
    # Several nodes on one index: each PBX is leased to one node (see `_ownership`),
    # renewed every lease_renew_s seconds, taken over lease_ttl_s after its node went quiet.
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    lease_renew_s: float = DEFAULT_LEASE_RENEW_S
    # The address this node's connections to the PBXs leave from (serve --bind); None: the
    # system's choice.
    bind: str | None = None
    # Where alerts go (a webhook, e-mail); None or nothing configured: no alerts.
    alerts: AlertSettings | None = None
    # The registry as it is now (called on a worker thread with the archiver's index)
    # and how often to look: PBXs added, changed or removed are picked up while running.
    # None: the PBXs given at start are archived until it stops.
    registry: Callable[[Index], RegistryView] | None = field(default=None, repr=False)
    registry_poll_s: float = 15.0
    # Registered PBXs this node cannot archive, with why (a password the master keys
    # loaded cannot open): said once at start, kept as their health for `status`, and not
    # said again while the registry gives the same reason.
    left_out: Mapping[str, str] = field(default_factory=dict)
    pbx_revision: str | None = None  # the first PBX's (see PbxTarget.revision)
    # Signs the audit chain's head (called on a worker thread with the archiver's index
    # and the time) every checkpoint_interval_s; None: no checkpoints from this node
    # (no master key to open the signing key with).
    checkpoint: Callable[[Index, datetime], None] | None = field(default=None, repr=False)
    checkpoint_interval_s: float = 300.0
    # The retention pass (called on a worker thread with the index, the storage and the
    # time); one node a day runs it (`retention_every_s`), the others skip their turn.
    retention: Callable[[Index, Storage, datetime], None] | None = field(default=None, repr=False)
    retention_every_s: float = 86_400.0
    # Encryption at rest: every recording archived from now on is encrypted under its own
    # data key, sealed with `keyring` (see `callvault.archive._workers`). `keyring` also
    # opens the data keys of encrypted copies already stored, with `encrypt` off.
    encrypt: bool = False
    keyring: Keyring | None = field(default=None, repr=False)

    def targets(self) -> list[PbxTarget]:
        """Every PBX to archive, the first one given by the config's own fields."""
        first = PbxTarget(
            pbx_url=self.pbx_url,
            username=self.username,
            password=self.password,
            registry_name=self.registry_name,
            api_version=self.api_version,
            kind=self.kind,
            tcp_report_port=self.tcp_report_port,
            tls=self.tls,
            timezone=self.timezone,
            workers=self.workers,
            events_allow=self.events_allow,
            revision=self.pbx_revision,
        )
        return [first, *self.more_pbxs]

    def resolved_db_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.archive / 'callvault.db').resolve()}"

    def pool_options(self) -> PoolOptions:
        """How the download workers work."""
        return PoolOptions(
            workers=self.workers,
            lease_s=self.job_lease_s,
            poll_interval_s=self.poll_interval_s,
            policy=self.policy,
            heartbeat_s=self.process_heartbeat_s,
            stale_after_s=self.stale_after_s,
            grace_s=self.shutdown_grace_s,
            keyring=self.keyring,
            encrypt=self.encrypt,
        )


class StartError(Exception):
    """The service cannot start; the message is one line for people."""


class ArchiveDirError(StartError):
    """The archive directory cannot be made or used (a file, under a file, no permission)."""

    def __init__(self, path: Path, exc: OSError) -> None:
        reason = exc.strerror or type(exc).__name__
        where = str(path)
        if exc.filename is not None and str(exc.filename) != where:
            reason = f"{exc.filename}: {reason}"
        super().__init__(f"cannot use the archive directory {where}: {reason}")
        self.path = path
        self.errno = exc.errno


def given_pbx_entry(
    index: Index,
    *,
    url: str,
    username: str,
    api_version: ApiVersion,
    tls: TlsOptions | None,
    timezone: ZoneInfo,
    workers: int = 2,
    events_allow: Sequence[str] | None = None,
    kind: str = "s-series",
) -> PbxRecord:
    """The registry entry of the PBX given by flags (`serve` and `backfill` without a
    registered PBX), under whose id its calls are recorded: the archive's own PBX, entry 0,
    its reports posted to the archive's secret path (see `index.pbxs.given_at_start`).
    PbxRegistryError for settings the registry refuses, or the URL of a PBX registered
    under a name."""
    from callvault.index.pbxs import PbxConfig

    tls = tls or TlsOptions()
    path = index.settings.setdefault(SettingKey.EVENTS_SECRET_PATH, new_secret_path(), _utcnow())
    given = PbxConfig(
        url=url,
        username=username,
        api_version=api_version.value,
        ca_file=str(tls.ca_file) if tls.ca_file is not None else None,
        pin_sha256=tls.pin_sha256,
        insecure=tls.insecure,
        tls_min_version=tls.minimum_version,
        timezone=timezone.key,
        max_downloads=max(1, min(workers, MAX_DOWNLOADS_LIMIT)),
        events_allow=tuple(events_allow or ()),
        kind=kind,
    )
    return index.pbxs.given_at_start(given, events_path=path, now=_utcnow())


def save_pbx_timezone(index: Index, tz: ZoneInfo) -> None:
    """Remember in the index the PBX time zone this archive is read with (see
    `SettingKey.PBX_TIMEZONE`: `callvault list` shows and filters times in it unless told
    another zone); the latest serve or backfill wins."""
    index.settings.set(SettingKey.PBX_TIMEZONE, tz.key, _utcnow())


def open_storage(path: Path, url: str | None = None) -> Storage:
    """The archive's storage: the one `url` names (``file:///DIR``, ``s3://BUCKET/P``),
    by default the directory `path` itself, where downloads in progress are staged in any
    case. `ArchiveDirError` if a directory is unusable, StartError for a bad URL."""
    try:
        return open_storage_url(url, path)
    except ValueError as exc:
        raise StartError(str(exc)) from None
    except OSError as exc:
        raise ArchiveDirError(path, exc) from exc


class Archiver:
    """The running service. See the module docstring."""

    def __init__(
        self,
        config: ArchiverConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        on_archived: Callable[[Archived], None] | None = None,
        # Called as factory(index, storage, service=ServiceProbe): the web app to serve.
        web_app_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config
        # The web layer sits above the archiver (see the layers): the CLI hands it in.
        self._web_app_factory = web_app_factory
        self._transport = transport
        self._on_archived = on_archived
        self.metrics = ArchiverMetrics()
        self.index: Index | None = None
        self.storage = open_storage(config.archive, config.storage_url)  # ArchiveDirError...
        self.events_port: int | None = None
        self.web_port: int | None = None
        self.secret_path: str | None = None
        self.pbx: PbxRecord | None = None  # its entry in the registry, once started
        self.lanes: list[_Lane] = []  # one per PBX, once started (the first is `pbx`...)
        self.ownership: Ownership | None = None
        self.alerter: Alerter | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    # The first PBX's parts (None while this node does not work on it).

    @property
    def session(self) -> PbxSession | None:
        return self.lanes[0].session if self.lanes else None

    @property
    def pool(self) -> WorkerPool | None:
        return self.lanes[0].pool if self.lanes else None

    @property
    def downloads(self) -> Downloads | None:
        return self.lanes[0].downloads if self.lanes else None

    @property
    def committer(self) -> GroupCommitter | None:
        return self.lanes[0].committer if self.lanes else None

    # -- in-process use (demo, tests) ----------------------------------------------------

    @property
    def events_url(self) -> str:
        """Where the receiver listens, with the secret path (tests post events here)."""
        if self.events_port is None or self.secret_path is None:
            raise RuntimeError("the archiver is not running")
        host = self.config.events_host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104
            host = "127.0.0.1"
        return f"http://{host}:{self.events_port}/{self.secret_path}"

    def start(self, timeout: float = 30.0) -> None:
        """Run the service in a background thread; return once events are accepted."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._thread_main, name="callvault-archiver")
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError("the archiver did not start in time")
        if self._error is not None:
            self.stop()
            raise self._error

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully and wait for the background thread."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Archiver:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.run(self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            log.exception("the archiver stopped on an error")
        finally:
            self._ready.set()

    # -- the service -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, ready: Callable[[], None] | None = None) -> None:
        """Run until `stop` is set, then shut down gracefully."""
        config = self.config
        loop = asyncio.get_running_loop()
        index = await asyncio.to_thread(open_index, config.resolved_db_url())
        self.index = index
        sockets: list[socket.socket] = []
        try:
            await asyncio.to_thread(self._storage_of_the_index, index)
            await self._run(stop, index, loop, sockets, ready)
        finally:
            for sock in sockets:
                sock.close()
            await asyncio.to_thread(index.close)

    def _storage_of_the_index(self, index: Index) -> None:
        """Use the storage where the index's recordings are (the one it remembers when no
        --storage was given); StartError if --storage names another place."""
        config = self.config
        try:
            url = storage_url_for(index, config.storage_url, config.archive, adopt=True)
        except StorageMismatch as exc:
            raise StartError(str(exc)) from None
        if url != config.storage_url:
            self.storage = open_storage(config.archive, url)

    async def _run(
        self,
        stop: asyncio.Event,
        index: Index,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        ready: Callable[[], None] | None,
    ) -> None:
        config = self.config
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.storage.clean_staging, timedelta(hours=1))
        targets = config.targets()
        node = config.node or default_node()
        lanes = [
            _Lane(self, target, node if len(targets) == 1 else f"{node}/{_lane_name(target)}")
            for target in targets
        ]
        for lane in lanes:
            await asyncio.to_thread(lane.open, index)
        names = [lane.name for lane in lanes]
        if len(set(names)) < len(names):
            raise StartError(f"a PBX is given twice: {', '.join(names)}")
        self.lanes = lanes
        first = lanes[0]
        self.pbx = first.pbx
        self.secret_path = first.secret_path
        await asyncio.to_thread(save_pbx_timezone, index, config.timezone)
        for name, problem in config.left_out.items():
            log.error("PBX %s cannot be archived: %s", name, problem)
            await asyncio.to_thread(note_left_out, index, name, problem, node)

        events_sock = listen("events", config.events_host, config.events_port, hint=_ANOTHER_SERVE)
        sockets.append(events_sock)
        self.events_port = int(events_sock.getsockname()[1])
        ownership = Ownership(
            index,
            lanes,
            node=node,
            ttl_s=config.lease_ttl_s,
            renew_s=config.lease_renew_s,
        )
        self.ownership = ownership
        try:
            for lane in lanes:
                lane.start_intake(index, self.events_port, ownership, loop)
            self.metrics.watch(lambda: [lane.figures() for lane in self.lanes])
            # Every port is bound before any work starts: a busy web port stops the start
            # before a single login or download.
            web = self._web_server(index, sockets)
            await ownership.register()
            await ownership.tick()  # alone, it wins the PBXs now (MAX_TAKEN_PER_ROUND first)
            await ownership.settle()  # their work started: "ready" waits for their logins
            await self._serve(stop, index, lanes, ownership, events_sock, web, ready)
        finally:
            try:
                await ownership.close()
            except Exception as exc:  # the lanes still stop below; the leases expire
                log.error("handing the PBXs over at shutdown failed: %s", exc, exc_info=exc)
            # Every lane still archived: those opened here and those the registry added
            # since (one taken off the registry was closed then, and left the list). A
            # lane whose intake never started has nothing to close but its name.
            for lane in reversed(self.lanes):
                await lane.close()
            log.info("stopped")
        if ownership.fenced.is_set():
            raise Fenced(ownership.fenced_reason or "this node was superseded")

    async def _serve(
        self,
        stop: asyncio.Event,
        index: Index,
        lanes: list[_Lane],
        ownership: Ownership,
        events_sock: socket.socket,
        web_server: tuple[Server, socket.socket] | None,
        ready: Callable[[], None] | None,
    ) -> None:
        """Receive, reconcile and download until `stop` is set (or the node is fenced);
        then stop the servers and commit what was received."""
        config = self.config
        loop = asyncio.get_running_loop()
        receiver = (
            lanes[0].receiver
            if len(lanes) == 1 and config.registry is None
            else _by_report_path(lambda: self.lanes)
        )
        events_server = server_for(receiver, header_timeout_s=config.event_header_timeout_s)
        servers: list[tuple[Server, asyncio.Future[None]]] = [
            (
                events_server,
                ServerThread(events_server, events_sock, name="callvault-events").start(),
            )
        ]
        work_stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        fenced = [ownership.fenced]
        try:
            if web_server is not None:
                servers.append(
                    (
                        web_server[0],
                        asyncio.create_task(web_server[0].serve(sockets=[web_server[1]])),
                    )
                )
            for lane in lanes:
                if lane.target.kind == "p-series":
                    if lane.webhook_secret is None:
                        log.info("taking the events of %s from its WebSocket", lane.describe())
                        continue
                    log.info(
                        "taking the events of %s from its WebSocket and its webhook at "
                        "http://%s:%d/(secret path; from %s)",
                        lane.describe(),
                        config.events_host,
                        self.events_port,
                        lane.allowed,
                    )
                    continue
                log.info(
                    "receiving the events of %s on %s:%d (secret path; from %s)",
                    lane.describe(),
                    config.events_host,
                    self.events_port,
                    lane.allowed,
                )
            tasks.append(
                asyncio.create_task(
                    _supervised("the PBX leases", lambda: ownership.run(work_stop), work_stop)
                )
            )
            tasks.append(asyncio.create_task(self._hear_notices(index, work_stop)))
            if config.registry is not None:
                follow = config.registry
                tasks.append(
                    asyncio.create_task(
                        _supervised(
                            "following the registry",
                            lambda: self._follow_registry(follow, index, ownership, work_stop),
                            work_stop,
                        )
                    )
                )
            if config.checkpoint is not None:
                sign = config.checkpoint
                tasks.append(
                    asyncio.create_task(
                        _supervised(
                            "the audit checkpoints",
                            lambda: _checkpoints(sign, index, config, work_stop),
                            work_stop,
                        )
                    )
                )
            if config.retention is not None:
                keep = config.retention
                tasks.append(
                    asyncio.create_task(
                        _supervised(
                            "the retention pass",
                            lambda: _retention(keep, index, self.storage, config, work_stop),
                            work_stop,
                        )
                    )
                )
            if config.alerts is not None and config.alerts.enabled:
                alerter = Alerter(index, self.storage, config.alerts, node=ownership.node)
                self.alerter = alerter
                tasks.append(
                    asyncio.create_task(
                        _supervised("the alerts", lambda: alerter.run(work_stop), work_stop)
                    )
                )
            while not events_server.started and not stop.is_set():
                if servers[0][1].done():
                    servers[0][1].result()
                await asyncio.sleep(0.01)
            # The PBX learns where to post events when we log in: "ready" waits (briefly) for
            # the first login attempt to end, so that calls ending from now on are reported.
            # The receiver starts on its own thread and is up in a few ms, often before the
            # login is done; a call placed in between would reach us only by reconciliation.
            deadline = loop.time() + _FIRST_LOGIN_WAIT_S
            while (
                any(lane.working and lane.session_state() == "connecting" for lane in lanes)
                and loop.time() < deadline
            ):
                if stop.is_set() or any(event.is_set() for event in fenced):
                    break
                await asyncio.sleep(0.01)
            self._ready.set()
            if ready is not None:
                ready()
            await _first(stop, *fenced)
        finally:
            if any(event.is_set() for event in fenced):
                log.error("shutting down: this process may no longer download (see above)")
            else:
                log.info("shutting down: no new events; finishing the jobs in progress")
            for server, _task in servers:
                server.should_exit = True
            for _server, task in servers:
                with contextlib.suppress(Exception):
                    await task
            for lane in lanes:
                await lane.stop_intake()
            work_stop.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _hear_notices(self, index: Index, stop: asyncio.Event) -> None:
        """Wake the workers of a PBX this node works on when any node commits new jobs of
        it (PostgreSQL; on SQLite the committing node is the working one)."""
        if not index.notices.supported:
            return
        loop = asyncio.get_running_loop()
        done = threading.Event()

        def wake(pbx_id: int) -> None:
            for lane in self.lanes:
                if lane.pbx is not None and lane.pbx.id == pbx_id:
                    lane.wake()

        def heard(pbx_id: int) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake, pbx_id)

        # A thread of its own: it listens for as long as serve runs, and must not hold one
        # of the loop's shared workers.
        listener = threading.Thread(
            target=index.notices.listen, args=(heard, done), name="callvault-notices", daemon=True
        )
        listener.start()
        try:
            await stop.wait()
        finally:
            done.set()
            await asyncio.to_thread(listener.join, 5.0)

    async def _follow_registry(
        self,
        follow: Callable[[Index], RegistryView],
        index: Index,
        ownership: Ownership,
        stop: asyncio.Event,
    ) -> None:
        """Every `registry_poll_s` seconds, bring the lanes in line with the registry: a
        PBX added gets a lane (its reports are taken at once; the next ownership round
        spreads it), one removed is handed over and its lane closed, one changed is
        closed and opened again with its new settings."""
        # The problem last logged for a PBX that cannot be used.
        told: dict[str, str] = dict(self.config.left_out)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.registry_poll_s)
            if stop.is_set():
                return
            wanted = await asyncio.to_thread(follow, index)
            await self._apply_registry(wanted, index, ownership, told)

    async def _apply_registry(
        self, wanted: RegistryView, index: Index, ownership: Ownership, told: dict[str, str]
    ) -> None:
        for lane in list(self.lanes):
            entry = wanted.get(lane.name)
            if entry is None:
                await self._retire(lane, ownership, "it was taken off the registry")
            elif isinstance(entry, PbxTarget) and entry != lane.target:
                await self._retire(lane, ownership, "its settings changed")
        running = {lane.name for lane in self.lanes}
        for name, entry in wanted.items():
            if isinstance(entry, str):
                if told.get(name) != entry:
                    log.error("PBX %s cannot be archived: %s", name, entry)
                    told[name] = entry
                await asyncio.to_thread(note_left_out, index, name, entry, ownership.node)
                continue
            if name in running:
                continue
            lane = _Lane(self, entry, f"{ownership.node}/{name}")
            try:
                await asyncio.to_thread(lane.open, index)
            except StartError as exc:
                if told.get(name) != str(exc):
                    log.error("PBX %s cannot be archived: %s", name, exc)
                    told[name] = str(exc)
                continue
            told.pop(name, None)
            assert self.events_port is not None
            lane.start_intake(index, self.events_port, ownership, asyncio.get_running_loop())
            self.lanes.append(lane)
            ownership.add_lane(lane)
            log.info("%s is archived from now on (registry)", lane.describe())

    async def _retire(self, lane: _Lane, ownership: Ownership, reason: str) -> None:
        """Stop archiving a PBX: hand it over if this node works on it (its downloads
        finish, its lease is released), then stop taking its reports."""
        if ownership.knows(lane):  # else its lease round found it removed, and said so
            log.info("%s: %s; this node stops archiving it", lane.describe(), reason)
        await ownership.remove_lane(lane, reason)
        self.lanes.remove(lane)
        await lane.close()

    def _archived(self, archived: Archived) -> None:
        self.metrics.archived_one(archived.seconds, archived.queued_at, archived.at)
        if self._on_archived is not None:
            self._on_archived(archived)

    def _web_server(
        self, index: Index, sockets: list[socket.socket]
    ) -> tuple[Server, socket.socket] | None:
        config = self.config
        if config.web_host is None or config.web_port is None:
            return None
        if self._web_app_factory is None:
            raise RuntimeError("web_host/web_port are set but no web app was given")
        probe = ServiceProbe(
            session_state=self.metrics.session_state,
            workers=self.metrics.workers,
            registry=self.metrics.registry,
        )
        app = self._web_app_factory(index, self.storage, service=probe)
        sock = listen("the web app", config.web_host, config.web_port, hint=_ANOTHER_SERVE)
        sockets.append(sock)
        self.web_port = int(sock.getsockname()[1])
        log.info("web app on http://%s:%d/", config.web_host, self.web_port)
        return server_for(app, trusted_proxy=config.web_trusted_proxy), sock


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter


# Delays before a supervised task that failed is started again (the last one repeats).
_RESTART_DELAYS_S = (1.0, 5.0, 30.0)


async def _supervised(
    what: str, start: Callable[[], Coroutine[Any, Any, None]], stop: asyncio.Event
) -> None:
    """Run `start()` until `stop` is set; if it fails, log at ERROR and start it again
    after a short delay. Its failures never go unnoticed. A `PbxError` (the PBX or the way
    to it failed: its message says all) is one line; anything else is a bug, logged with
    its traceback the first time."""
    failures = 0
    while not stop.is_set():
        try:
            await start()
            return
        except Exception as exc:
            delay = _RESTART_DELAYS_S[min(failures, len(_RESTART_DELAYS_S) - 1)]
            failures += 1
            pbx_error = isinstance(exc, PbxError)
            log.error(
                "%s failed: %s%s; starting it again in %.0f s",
                what,
                "" if pbx_error else f"{type(exc).__name__}: ",
                exc,
                delay,
                exc_info=exc if failures == 1 and not pbx_error else None,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)


async def _checkpoints(
    sign: Callable[[Index, datetime], None],
    index: Index,
    config: ArchiverConfig,
    stop: asyncio.Event,
) -> None:
    """Sign the audit chain's head now and every `checkpoint_interval_s` (a failure is
    raised to the supervisor, which logs it and starts this again)."""
    while not stop.is_set():
        await asyncio.to_thread(sign, index, datetime.now(UTC))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=config.checkpoint_interval_s)


# How often a node asks whether the retention pass is its turn.
_RETENTION_LOOK_S = 600.0


async def _retention(
    run: Callable[[Index, Storage, datetime], None],
    index: Index,
    storage: Storage,
    config: ArchiverConfig,
    stop: asyncio.Event,
) -> None:
    """Run the retention pass when it is this node's turn: once in `retention_every_s`
    across all nodes (`settings.claim_turn`)."""
    every = timedelta(seconds=config.retention_every_s)
    while not stop.is_set():
        now = datetime.now(UTC)
        if await asyncio.to_thread(
            index.settings.claim_turn, SettingKey.RETENTION_PASS_AT, now=now, every=every
        ):
            await asyncio.to_thread(run, index, storage, now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                stop.wait(), timeout=min(_RETENTION_LOOK_S, config.retention_every_s)
            )


def _lane_name(target: PbxTarget) -> str:
    return target.registry_name or "main"


def _by_report_path(lanes: Callable[[], Sequence[_Lane]]) -> Any:
    """One receiver for the reports of several PBXs (`lanes()`: those archived now): each
    goes to the receiver of the PBX whose secret path it was posted to; anything else to
    the first one's, which refuses it (403 from an address no PBX may post from, else 404)
    and logs it."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        current = [lane for lane in lanes() if lane.receiver is not None]
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope["path"].encode()
            path = raw.split(b"?", 1)[0].strip(b"/")
            for lane in current:
                if hmac.compare_digest(path, lane.secret_path.strip("/").encode()):
                    await lane.receiver(scope, receive, send)
                    return
        if current:
            await current[0].receiver(scope, receive, send)
        elif scope["type"] == "http":  # no PBX archived here (the registry is empty)
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    return app


class _Lane:
    """One PBX of a running archiver. Its intake (report receiver and group committer)
    runs as long as the service; its work (API client and session, download workers as a
    registered process of their own, reconciliation) while this node holds its lease
    (`start_work` / `stop_work`, driven by `Ownership`). One broken PBX stops nothing of
    the others'."""

    def __init__(self, archiver: Archiver, target: PbxTarget, node: str) -> None:
        self._archiver = archiver
        self.target = target
        self.node = node
        self.pbx: PbxRecord | None = None
        self.allowed: SourceAllowList | None = None
        self.committer: GroupCommitter | None = None
        self.receiver: Any = None
        # Its lease, while this node holds it (see `Ownership`), and the monotonic time
        # after which it may not talk to the PBX unless the lease was renewed.
        self.lease: Lease | None = None
        self.lease_deadline = 0.0
        self.client: PbxClient | PSeriesClient | None = None
        self.session: PbxSession | None = None
        # Set to reconcile now rather than at the next interval (a P-Series event stream
        # that was broken: the events of the gap are not sent again).
        self._reconcile_soon = asyncio.Event()
        self.downloads: Downloads | None = None
        self.pool: WorkerPool | None = None
        self._index: Index | None = None
        self._events_port = 0
        self._ownership: Ownership | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work_stop: asyncio.Event | None = None
        self._work_tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.pbx.name if self.pbx is not None else _lane_name(self.target)

    @property
    def pbx_id(self) -> int:
        assert self.pbx is not None
        return self.pbx.id

    @property
    def secret_path(self) -> str:
        assert self.pbx is not None
        return self.pbx.events_path

    @property
    def working(self) -> bool:
        """Whether this node works on the PBX now (holds its lease, its workers run)."""
        return self.pool is not None

    def describe(self) -> str:
        return f"PBX {self.name} ({self.target.pbx_url})"

    def open(self, index: Index) -> None:
        """Its registry entry (the one named, else the entry of the PBX of the flags, made
        or brought up to date now) and who may post its reports. StartError if the registry
        has no such name or refuses the flags."""
        from callvault.index.pbxs import PbxRegistryError

        target = self.target
        try:
            if target.registry_name is not None:
                self.pbx = index.pbxs.require(target.registry_name)
            else:
                self.pbx = given_pbx_entry(
                    index,
                    url=target.pbx_url,
                    username=target.username,
                    api_version=target.api_version,
                    tls=target.tls,
                    timezone=target.timezone,
                    workers=target.workers,
                    events_allow=target.events_allow,
                    kind=target.kind,
                )
        except PbxRegistryError as exc:
            raise StartError(str(exc)) from None
        host = urlsplit(target.pbx_url).hostname or ""
        self.allowed = allow_list_for(host, target.events_allow)

    # -- intake: always ------------------------------------------------------------------

    def start_intake(
        self,
        index: Index,
        events_port: int,
        ownership: Ownership,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """The group committer and the report receiver: reports of this PBX are taken and
        committed here whoever works on it; new jobs wake its workers, here or (through a
        notice) on the node that holds it."""
        archiver, config, target, pbx = self._archiver, self._archiver.config, self.target, self.pbx
        assert pbx is not None and self.allowed is not None
        self._index, self._events_port, self._ownership, self._loop = (
            index,
            events_port,
            ownership,
            loop,
        )
        notices = index.notices

        def committed(results: list[RecordResult]) -> None:
            if any(r.new_recording for r in results):
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.wake)
                if notices.supported:
                    try:
                        notices.announce(pbx.id)
                    except Exception as exc:  # the owner finds the jobs by polling
                        log.warning("cannot announce new jobs of PBX %s: %s", self.name, exc)

        committer = GroupCommitter(index, tz=target.timezone, on_committed=committed, pbx_id=pbx.id)
        self.committer = committer
        committer.start()

        def bootup(_event: Event) -> None:
            # Called on the receiver's own loop (see _ReceiverThread): the session lives here.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._request_relogin)

        # A P-Series PBX's receiver takes its signed webhooks (beside its WebSocket): the
        # same call committed twice is stored once (`index.calls.record` upserts).
        webhook = target.kind == "p-series"
        self.webhook_secret: str | None = None
        if webhook and pbx.webhook_secret_sealed is not None:
            from callvault.index.pbxs import webhook_secret_context
            from callvault.keys import MasterKeyError

            if config.keyring is None:
                log.error(
                    "%s: its webhooks are refused: its webhook secret is sealed and no master "
                    "key is loaded (--master-key-file)",
                    self.describe(),
                )
            else:
                try:
                    self.webhook_secret = config.keyring.open(
                        pbx.webhook_secret_sealed, webhook_secret_context(pbx.name)
                    ).decode()
                except (MasterKeyError, UnicodeDecodeError) as exc:
                    log.error(
                        "%s: its webhooks are refused: its webhook secret cannot be opened: %s",
                        self.describe(),
                        exc,
                    )
        self.receiver = create_receiver_app(
            secret_path=pbx.events_path,
            allowed=self.allowed,
            commit=self._serial_noting(committer, index),
            on_bootup=bootup,
            on_answer=archiver.metrics.event,
            max_body=config.max_event_body,
            body_timeout_s=config.event_body_timeout_s,
            tz=target.timezone,
            webhook=webhook,
            webhook_secret=self.webhook_secret,
        )

    def wake(self) -> None:
        """New jobs: wake the workers, if this node works on the PBX."""
        if self.pool is not None:
            self.pool.wake()

    def _request_relogin(self) -> None:
        if self.session is not None:
            self.session.request_relogin()

    async def stop_intake(self) -> None:
        """Commit what was received (the receiver has stopped)."""
        if self.committer is not None:
            await asyncio.to_thread(self.committer.stop)

    # -- work: while this node holds the lease -------------------------------------------

    def _may_talk(self) -> str | None:
        ownership = self._ownership
        return None if ownership is None else ownership.may_talk(self)

    async def start_work(self) -> None:
        """Log-in client, session, download workers and reconciliation (the login itself
        happens in the session's task)."""
        archiver, config, target, pbx = self._archiver, self._archiver.config, self.target, self.pbx
        index, loop = self._index, self._loop
        assert pbx is not None and index is not None and loop is not None
        client = self._client(index)
        self.client = client

        def write_health(value: str) -> None:
            loop.run_in_executor(None, index.pbxs.report_session, pbx.id, value)

        session = PbxSession(
            client,
            write_health=write_health,
            heartbeat_interval_s=config.heartbeat_interval_s,
            transport_retry_s=config.login_retry_s,
            label=self._label(),
            kind=target.kind,
            fix=self._login_fix(),
        )
        if target.registry_name is not None:
            record = await asyncio.to_thread(index.pbxs.get, target.registry_name)
            # Only if the test tried this lane's login (a change since restarts the lane).
            refused = None
            if record is not None and record.revision == target.revision:
                refused = record.test_refusal
            if refused is not None:
                session.refused_elsewhere(
                    refused.at,
                    f"the PBX refused this login to `callvault pbx test` at "
                    f"{refused.at:%H:%M:%S} UTC ({refused.error})",
                )
        self.session = session
        options = replace(
            config.pool_options(),
            workers=target.workers,
            pbx_id=pbx.id,
            label=self.name if self._several() else "",
        )
        downloads = Downloads(
            index,
            archiver.storage,
            client,
            tz=target.timezone,
            kind="serve",
            node=self.node,
            options=options,
            session=session,
            on_archived=archiver._archived,
            on_failed_attempt=archiver.metrics.failed_attempt,
        )
        try:
            pool = await downloads.start()
        except BaseException as exc:
            self.session = self.client = None
            with contextlib.suppress(Exception):
                await client.aclose()
            if isinstance(exc, OSError):
                raise ArchiveDirError(config.archive, exc) from exc
            raise
        self.downloads, self.pool = downloads, pool
        stop = self._work_stop = asyncio.Event()
        self._work_tasks = self._tasks(index, stop)

    def _login_fix(self) -> str:
        """What an operator does about a refused login of this PBX, in words."""
        p_series = self.target.kind == "p-series"
        if self.target.registry_name is None:  # the PBX of serve's flags
            what = "Client Secret" if p_series else "API password"
            return (
                f"restart serve with the right {what} in CALLVAULT_PASSWORD (or the variable "
                "--password-env names)"
            )
        if p_series:
            return (
                f"`callvault pbx edit {self.name} --secret-env VAR`, VAR holding the Client "
                "Secret of the PBX's API app"
            )
        return (
            f"`callvault pbx edit {self.name} --password-env VAR`, VAR holding the PBX's API "
            "password"
        )

    def _client(self, index: Index) -> PbxClient | PSeriesClient:
        """The API client of the PBX's kind. A P-Series PBX's tokens are kept in its
        registry entry (sealed) when the master key is at hand, so a restart or the next
        node goes on with them; an S-Series or Cloud PBX is told where to post its
        reports."""
        archiver, config, target, pbx = self._archiver, self._archiver.config, self.target, self.pbx
        assert pbx is not None
        common: dict[str, Any] = {
            "tls": target.tls,
            "transport": archiver._transport,
            "timeout": config.client_timeout,
            "max_attempts": config.client_max_attempts,
            "backoff_base": config.client_backoff_base,
            "backoff_max": config.client_backoff_max,
            "local_address": config.bind,
            "guard": self._may_talk,
        }
        if target.kind == "p-series":
            store = (
                IndexTokenStore(index, pbx.id, pbx.name, config.keyring)
                if config.keyring is not None
                else None
            )
            return PSeriesClient(
                target.pbx_url,
                target.username,
                target.password,
                token_store=store,
                # The session's heartbeat renews the token: it must come before it ends.
                refresh_before=config.heartbeat_interval_s + 120.0,
                **common,
            )
        return PbxClient(
            target.pbx_url,
            target.username,
            target.password,
            api_version=target.api_version,
            events_port=self._events_port,
            # Reports go to the node that logged in, or wherever the registry says (an
            # absolute address, e.g. a load balancer: any node takes any PBX's reports).
            events_url=(
                pbx.events_path
                if pbx.config.report_url is None
                else f"{pbx.config.report_url}/{pbx.events_path}"
            ),
            events_urltag=pbx.config.report_url is not None,
            **common,
        )

    async def _events_loop(self, client: PSeriesClient, index: Index, stop: asyncio.Event) -> None:
        """A P-Series PBX's events, over the WebSocket the client keeps open: each call's
        NewCdr (30012) is committed as a report of the S-Series would be; after a break,
        the gap is reconciled from the PBX's call history (it does not send them again).

        The stream opens once the session has logged in, and a refused login it meets
        (`ErrorKind.LOGIN_REFUSED`: a wrong Client Secret, a blocked IP) is the session's
        to handle: it pauses (one line logged, the health says why and what to do) and
        the stream waits for its next login, not for the supervisor's short restarts."""
        committer, session = self.committer, self.session
        assert committer is not None and session is not None
        commit = self._serial_noting(committer, index)
        while not stop.is_set():
            await session.ready.wait()
            try:
                async for event in client.events():
                    if stop.is_set():
                        return
                    if isinstance(event, NewCdrEvent):
                        session.report_success()
                        await self._take_report(event.cdr, commit)
                    elif isinstance(event, EventsResumed):
                        log.info("%s: events resumed; reconciling the gap", self.describe())
                        self._reconcile_soon.set()
            except PbxError as exc:
                if not refused_login(exc):
                    raise
                log.info("the event stream of %s waits for the next login", self.describe())
                session.report_auth_failure(exc)  # the session pauses: `ready` is cleared
                continue
            return  # the client was closed: the stream ended

    async def _take_report(
        self, cdr: CallDetail, commit: Callable[[CallDetail], Awaitable[RecordResult]]
    ) -> None:
        """A NewCdr read from the PBX's event stream (WebSocket or TCP), checked by the
        receiver's rules for a posted one and committed. One that can never be stored is
        logged and skipped: it neither stops the stream nor comes back."""
        metrics = self._archiver.metrics
        problem = validate_cdr(cdr, self.target.timezone)
        if problem is not None:
            log.warning(
                "%s: NewCdr for call %.80r skipped: %s", self.describe(), cdr.callid, problem
            )
            metrics.event(400)
            return
        try:
            await commit(cdr)
        except InvalidCallDetail as exc:
            log.warning("%s: NewCdr refused by the index: %s", self.describe(), exc)
            metrics.event(400)
            return
        metrics.event(200)

    async def _tcp_reports_loop(self, client: PbxClient, index: Index, stop: asyncio.Event) -> None:
        """An S-Series v2 PBX whose Report Method is TCP (its login says so) sends no
        reports over HTTP: they are taken from a connection to its report port instead,
        committed as posted reports are, and the gap after a broken connection reconciled
        at once. A refused login there is not tried again for `_TCP_LOGIN_PAUSE_S`: five
        refusals lock this host out of the PBX."""
        session, committer, target = self.session, self.committer, self.target
        assert session is not None and committer is not None
        await session.ready.wait()
        if client.report_transport != "TCP":
            return  # its reports come over HTTP
        port = target.tcp_report_port
        if port is None:
            log.error(
                "%s reports over TCP (Report Method = TCP on its API page), but its TCP "
                "report port is not set: `callvault pbx edit %s --tcp-report-port PORT`; "
                "until then its calls are found by reconciliation only",
                self.describe(),
                self.name,
            )
            await stop.wait()
            return
        host = urlsplit(target.pbx_url).hostname or ""
        commit = self._serial_noting(committer, index)
        log.info("taking the reports of %s from its TCP port %d", self.describe(), port)
        while not stop.is_set():
            try:
                async for event in tcp_reports(
                    host,
                    port,
                    target.username,
                    target.password,
                    local_address=self._archiver.config.bind,
                ):
                    if isinstance(event, NewCdrEvent):
                        await self._take_report(event.cdr, commit)
                    elif isinstance(event, BootUpEvent):
                        self._request_relogin()
                    elif isinstance(event, EventsResumed):
                        log.info("%s: reports resumed; reconciling the gap", self.describe())
                        self._reconcile_soon.set()
            except AuthError as exc:
                log.error(
                    "%s refused the login of its TCP report connection (%s); not trying "
                    "again for %.0f s",
                    self.describe(),
                    exc,
                    _TCP_LOGIN_PAUSE_S,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=_TCP_LOGIN_PAUSE_S)

    async def stop_work(self, *, reason: str, graceful: bool) -> None:
        """Stop working on the PBX: downloads in flight finish (`graceful`; else they are
        cancelled and handed back at once), the session logs out (`graceful` only: the PBX
        may be another node's by now, and its login ended this node's token already).
        One stop at a time: a second (a lost lease while the registry closes the lane)
        waits for the first, and finds nothing left to stop."""
        async with self._stopping:
            await self._stop_work(reason=reason, graceful=graceful)

    async def _stop_work(self, *, reason: str, graceful: bool) -> None:
        if self._work_stop is not None:
            self._work_stop.set()
        for task in self._work_tasks:
            task.cancel()
        for task in self._work_tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._work_tasks, self._work_stop = [], None
        downloads, session, client = self.downloads, self.session, self.client
        if downloads is not None:
            if not graceful and downloads.pool is not None:
                downloads.pool.fence(reason)
            await downloads.stop()
        if session is not None and graceful:
            await session.close()
        if client is not None:
            with contextlib.suppress(Exception):
                if graceful:
                    await client.aclose()  # logs out, if the session has not
                else:
                    await client.close_connections()
        self.downloads = self.pool = None
        self.session = self.client = None

    def work_fenced(self) -> str | None:
        """Why the workers stopped on their own (their process row was ended by another
        process), or None."""
        downloads = self.downloads
        if downloads is None or downloads.pool is None or not downloads.fenced.is_set():
            return None
        return str(downloads.fenced_error())

    def _several(self) -> bool:
        archiver = self._archiver
        return len(archiver.config.more_pbxs) > 0 or len(archiver.lanes) > 1

    def _label(self) -> str:
        """How log lines name this PBX: "the PBX" when it is the only one."""
        return f"PBX {self.name}" if self._several() else "the PBX"

    def _tasks(self, index: Index, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        """Its session upkeep and reconciliation, each supervised."""
        session = self.session
        assert session is not None
        suffix = f" of PBX {self.name}" if self._several() else ""
        client = self.client
        events = []
        if isinstance(client, PbxClient) and client.api_version.is_v2:
            events.append(
                asyncio.create_task(
                    _supervised(
                        f"the TCP reports{suffix}",
                        lambda: self._tcp_reports_loop(client, index, stop),
                        stop,
                    )
                )
            )
        if isinstance(client, PSeriesClient):
            events.append(
                asyncio.create_task(
                    _supervised(
                        f"the event stream{suffix}",
                        lambda: self._events_loop(client, index, stop),
                        stop,
                    )
                )
            )
        return [
            *events,
            asyncio.create_task(
                _supervised(f"the PBX session{suffix}", lambda: session.run(stop), stop)
            ),
            asyncio.create_task(
                _supervised(
                    f"reconciliation{suffix}", lambda: self._reconcile_loop(index, stop), stop
                )
            ),
            asyncio.create_task(
                _supervised(
                    f"backfill requests{suffix}", lambda: self._requests_loop(index, stop), stop
                )
            ),
        ]

    def session_state(self) -> str:
        return str(self.session.health["state"]) if self.session is not None else "connecting"

    def figures(self) -> PbxFigures:
        configured, alive = self.workers()
        return PbxFigures(
            self.name, self.session_state(), configured, alive, self.working, self.target.kind
        )

    def workers(self) -> tuple[int, int]:
        return (self.pool.configured, self.pool.alive) if self.pool is not None else (0, 0)

    async def close(self) -> None:
        """Stop working (if still working) and commit what was received."""
        if self.working:
            await self.stop_work(reason="shutting down", graceful=True)
        await self.stop_intake()

    def _serial_noting(
        self, committer: GroupCommitter, index: Index
    ) -> Callable[[CallDetail], Coroutine[Any, Any, RecordResult]]:
        """`committer.commit`, noting in the registry the serial the PBX's reports give
        (once per new value; the registry is not touched for every report)."""
        name = self.name
        noted: set[str] = set()

        async def commit(cdr: CallDetail) -> RecordResult:
            result = await committer.commit(cdr)
            if cdr.sn and cdr.sn not in noted:
                noted.add(cdr.sn)
                try:
                    await asyncio.to_thread(index.pbxs.learn_serial, name, cdr.sn, now=_utcnow())
                except Exception:
                    log.exception("could not note PBX %s's serial in the registry", name)
            return result

        return commit

    async def _requests_loop(self, index: Index, stop: asyncio.Event) -> None:
        """Run the backfills asked of this PBX (`callvault backfill` while a node holds
        it), one at a time, with this node's session: the PBX sees no second login. A
        request stopped by a hand-over, or by a fault that may pass, waits for the next
        round (here, or on the PBX's next holder); it resumes where it got to."""
        config = self._archiver.config
        client, session, pool, pbx = self.client, self.session, self.pool, self.pbx
        assert client is not None and session is not None and pool is not None
        assert pbx is not None
        while not stop.is_set():
            await session.ready.wait()
            request = await asyncio.to_thread(
                index.backfills.claim, pbx.id, node=self.node, now=_utcnow()
            )
            if request is not None:
                await self._run_request(request, index, client, pool.wake)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=config.poll_interval_s)

    async def _run_request(
        self,
        request: BackfillRequest,
        index: Index,
        client: PbxClient | PSeriesClient,
        wake: Callable[[], None],
    ) -> None:
        log.info(
            "backfill of %s from %s to %s, asked by %s",
            self.describe(),
            request.since.isoformat(),
            request.until.isoformat(),
            request.requested_by or "someone",
        )
        loop = asyncio.get_running_loop()

        def figures(stats: BackfillStats, total: int) -> dict[str, int]:
            return {
                "windows_done": stats.windows + stats.windows_skipped,
                "windows": total,
                "calls": stats.calls,
                "queued": stats.queued,
                "skipped": stats.skipped,
            }

        def on_window(_a: datetime, _b: datetime, stats: BackfillStats, total: int) -> None:
            loop.run_in_executor(None, index.backfills.progress, request.id, figures(stats, total))

        try:
            stats = await backfill(
                client,
                index,
                since=request.since,
                until=request.until,
                tz=self.target.timezone,
                pbx=self.target.pbx_url,
                pbx_id=request.pbx_id,
                on_window=on_window,
                on_queued=wake,
            )
        except asyncio.CancelledError:  # a hand-over or shutdown: the next holder resumes
            with contextlib.suppress(Exception):
                await asyncio.to_thread(index.backfills.release, request.id)
            raise
        except (PbxTransportError, PbxBusy, AuthError, SessionWithdrawn) as exc:
            log.warning("backfill of %s paused, tried again soon: %s", self.describe(), exc)
            await asyncio.to_thread(index.backfills.release, request.id, error=str(exc))
            await asyncio.sleep(self._archiver.config.poll_interval_s)
            return
        except Exception as exc:  # cannot succeed as asked (e.g. the PBX refuses the range)
            log.error("backfill of %s failed: %s", self.describe(), exc)
            await asyncio.to_thread(
                functools.partial(
                    index.backfills.finish,
                    request.id,
                    ok=False,
                    progress=request.progress,
                    error=str(exc),
                    now=_utcnow(),
                )
            )
            return
        total = stats.windows + stats.windows_skipped
        await asyncio.to_thread(
            functools.partial(
                index.backfills.finish,
                request.id,
                ok=True,
                progress=figures(stats, total),
                now=_utcnow(),
            )
        )
        log.info(
            "backfill of %s done: %d calls, %d recordings queued",
            self.describe(),
            stats.calls,
            stats.queued,
        )

    async def _reconcile_loop(self, index: Index, stop: asyncio.Event) -> None:
        config = self._archiver.config
        client, session, pool, pbx = self.client, self.session, self.pool, self.pbx
        assert client is not None and session is not None and pool is not None
        assert pbx is not None
        # Every P-Series PBX has its call history (cdr/search); an S-Series from API v1.1.0.
        cdr_export = not isinstance(client, PbxClient) or client.api_version.has_cdr_export
        if isinstance(client, PbxClient) and not cdr_export:
            log.warning(
                "API %s has no CDR export: calls of %s whose events are missed while serve is "
                "down are not found again (use API v1.1.0 or later if the firmware has it)",
                client.api_version.value,
                self.describe(),
            )
        first = True
        while not stop.is_set():
            if not first or config.reconcile_at_start:
                await session.ready.wait()
                try:
                    await reconcile(
                        client,
                        index,
                        hours=config.reconcile_hours,
                        tz=self.target.timezone,
                        on_queued=pool.wake,
                        cdr_export=cdr_export,
                        pbx_id=pbx.id,
                        label=self._label() if self._several() else "",
                    )
                except Exception as exc:
                    log.warning(
                        "reconcile of %s failed (next try in %.0f s): %s",
                        self.describe(),
                        config.reconcile_interval_s,
                        exc,
                    )
            first = False
            soon = self._reconcile_soon
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(soon.wait())]
            try:
                await asyncio.wait(
                    waits, timeout=config.reconcile_interval_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiting in waits:
                    waiting.cancel()
            soon.clear()
