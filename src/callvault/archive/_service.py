"""The archiver service assembled: receiver + session + workers + reconciliation.

`Archiver(config).run(stop)` is the whole of `callvault serve` as a coroutine; the
`start()`/`stop()` pair (or `with Archiver(config) as archiver:`) runs it in a
background thread for the demo and for tests.

The downloads run as a registered process of kind "serve" on node `config.node` (default
the host name; see `Downloads`): a restart of the same node takes over the downloads its
predecessor held at once. The session and reconciliation tasks are supervised: one that
fails is logged at ERROR and started again. If the process is fenced (its registration was
ended by another process), it stops downloading at once, shuts down and `run` raises
`Fenced`.

Shutdown order (SIGTERM/SIGINT in the CLI, `stop()` in process): stop accepting events,
commit what was received, let in-flight downloads finish (or release them), mark the
process stopped, log out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx

from callvault.archive._backfill import reconcile
from callvault.archive._commit import GroupCommitter
from callvault.archive._downloads import Downloads, PoolOptions
from callvault.archive._metrics import ArchiverMetrics, ServiceProbe
from callvault.archive._policy import RetryPolicy
from callvault.archive._process import DEFAULT_HEARTBEAT_S, DEFAULT_STALE_AFTER_S, default_node
from callvault.archive._receiver import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY,
    SourceAllowList,
    allow_list_for,
    create_receiver_app,
    new_secret_path,
)
from callvault.archive._session import PbxSession
from callvault.archive._workers import Archived, WorkerPool
from callvault.index import Index, RecordResult, SettingKey, open_index
from callvault.index.pbxs import MAX_DOWNLOADS_LIMIT, PbxRecord
from callvault.pbx import ApiVersion, CallDetail, Event, PbxClient, TlsOptions
from callvault.serving import (
    DEFAULT_HEADER_TIMEOUT_S,
    Server,
    ServerThread,
    listen,
    server_for,
)
from callvault.storage import LocalStorage, Storage

log = logging.getLogger("callvault.archive")


# What a busy port most likely means for `serve`.
_ANOTHER_SERVE = "is another callvault serve running?"

# How long start-up waits for the first login attempt before saying it is ready.
_FIRST_LOGIN_WAIT_S = 5.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class ArchiverConfig:
    """Everything the service needs; the CLI builds it from `ArchiveSettings`."""

    pbx_url: str
    username: str
    password: str = field(repr=False)
    archive: Path
    # A PBX of the registry (`callvault pbx add`), by name. None: the PBX these settings
    # give (the one-PBX shorthand of serve's flags), which becomes the registry's entry of
    # the archive's own PBX at start (`index.pbxs.given_at_start`).
    registry_name: str | None = None
    db_url: str | None = None  # default: sqlite file ARCHIVE/callvault.db
    api_version: ApiVersion = ApiVersion.V1_1_0
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
) -> PbxRecord:
    """The registry entry of the PBX given by flags (`serve` and `backfill` without a
    registered PBX), under whose id its calls are recorded: the archive's own PBX, known by
    its secret report path (see `index.pbxs.given_at_start`). PbxRegistryError for
    settings the registry refuses."""
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
    )
    return index.pbxs.given_at_start(given, events_path=path, now=_utcnow())


def save_pbx_timezone(index: Index, tz: ZoneInfo) -> None:
    """Remember in the index the PBX time zone this archive is read with (see
    `SettingKey.PBX_TIMEZONE`: `callvault list` shows and filters times in it unless told
    another zone); the latest serve or backfill wins."""
    index.settings.set(SettingKey.PBX_TIMEZONE, tz.key, _utcnow())


def open_storage(path: Path) -> Storage:
    """The archive's storage (a `LocalStorage` in `path`), made if missing;
    `ArchiveDirError` if unusable."""
    try:
        return LocalStorage(path)
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
        self.storage = open_storage(config.archive)  # ArchiveDirError if unusable
        self.events_port: int | None = None
        self.web_port: int | None = None
        self.secret_path: str | None = None
        self.pbx: PbxRecord | None = None  # its entry in the registry, once started
        self.session: PbxSession | None = None
        self.pool: WorkerPool | None = None
        self.downloads: Downloads | None = None
        self.committer: GroupCommitter | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

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
            await self._run(stop, index, loop, sockets, ready)
        finally:
            for sock in sockets:
                sock.close()
            await asyncio.to_thread(index.close)

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
        pbx = await asyncio.to_thread(self._registry_entry, index)
        self.pbx = pbx
        self.secret_path = pbx.events_path
        await asyncio.to_thread(save_pbx_timezone, index, config.timezone)
        pbx_host = urlsplit(config.pbx_url).hostname or ""
        allowed = await asyncio.to_thread(allow_list_for, pbx_host, config.events_allow)

        events_sock = listen("events", config.events_host, config.events_port, hint=_ANOTHER_SERVE)
        sockets.append(events_sock)
        self.events_port = int(events_sock.getsockname()[1])

        client = PbxClient(
            config.pbx_url,
            config.username,
            config.password,
            api_version=config.api_version,
            tls=config.tls,
            events_port=self.events_port,
            events_url=self.secret_path,
            transport=self._transport,
            timeout=config.client_timeout,
            max_attempts=config.client_max_attempts,
            backoff_base=config.client_backoff_base,
            backoff_max=config.client_backoff_max,
        )

        def write_health(value: str) -> None:
            loop.run_in_executor(None, index.pbxs.report_session, pbx.id, value)

        session = PbxSession(
            client,
            write_health=write_health,
            heartbeat_interval_s=config.heartbeat_interval_s,
            transport_retry_s=config.login_retry_s,
        )
        self.session = session
        downloads = Downloads(
            index,
            self.storage,
            client,
            tz=config.timezone,
            kind="serve",
            node=config.node or default_node(),
            options=replace(config.pool_options(), pbx_id=pbx.id),
            session=session,
            on_archived=self._archived,
            on_failed_attempt=self.metrics.failed_attempt,
        )
        self.downloads = downloads
        try:
            pool = await downloads.start()
        except OSError as exc:
            raise ArchiveDirError(config.archive, exc) from exc
        self.pool = pool
        self.metrics.watch(
            session_state=lambda: str(session.health["state"]),
            workers=lambda: (pool.configured, pool.alive),
        )
        try:
            await self._serve(
                stop, index, client, session, downloads, pool, events_sock, allowed, sockets, ready
            )
        finally:
            await downloads.stop()
            await session.close()
            with contextlib.suppress(Exception):
                await client.aclose()
            log.info("stopped")
        if downloads.fenced.is_set():
            raise downloads.fenced_error()

    async def _serve(
        self,
        stop: asyncio.Event,
        index: Index,
        client: PbxClient,
        session: PbxSession,
        downloads: Downloads,
        pool: WorkerPool,
        events_sock: socket.socket,
        allowed: SourceAllowList,
        sockets: list[socket.socket],
        ready: Callable[[], None] | None,
    ) -> None:
        """Receive, reconcile and download until `stop` is set (or the pool is fenced);
        then stop the servers and commit what was received."""
        config = self.config
        loop = asyncio.get_running_loop()
        secret_path = self.secret_path
        assert secret_path is not None and self.events_port is not None

        def committed(results: list[RecordResult]) -> None:
            if any(r.new_recording for r in results):
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(pool.wake)

        assert self.pbx is not None
        committer = GroupCommitter(
            index, tz=config.timezone, on_committed=committed, pbx_id=self.pbx.id
        )
        self.committer = committer
        committer.start()

        def bootup(_event: Event) -> None:
            # Called on the receiver's own loop (see _ReceiverThread): the session lives here.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(session.request_relogin)

        receiver = create_receiver_app(
            secret_path=secret_path,
            allowed=allowed,
            commit=self._serial_noting(committer, index),
            on_bootup=bootup,
            on_answer=self.metrics.event,
            max_body=config.max_event_body,
            body_timeout_s=config.event_body_timeout_s,
            tz=config.timezone,
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
        try:
            web_server = self._web_server(index, sockets)
            if web_server is not None:
                servers.append(
                    (
                        web_server[0],
                        asyncio.create_task(web_server[0].serve(sockets=[web_server[1]])),
                    )
                )
            log.info(
                "receiving PBX events on %s:%d (secret path, sources %s)",
                config.events_host,
                self.events_port,
                allowed,
            )
            tasks = [
                asyncio.create_task(
                    _supervised("the PBX session", lambda: session.run(work_stop), work_stop)
                ),
                asyncio.create_task(
                    _supervised(
                        "reconciliation",
                        lambda: self._reconcile_loop(client, index, pool, session, work_stop),
                        work_stop,
                    )
                ),
            ]
            while not events_server.started and not stop.is_set():
                if servers[0][1].done():
                    servers[0][1].result()
                await asyncio.sleep(0.01)
            # The PBX learns where to post events when we log in: "ready" waits (briefly) for
            # the first login attempt to end, so that calls ending from now on are reported.
            # The receiver starts on its own thread and is up in a few ms, often before the
            # login is done; a call placed in between would reach us only by reconciliation.
            deadline = loop.time() + _FIRST_LOGIN_WAIT_S
            while session.health["state"] == "connecting" and loop.time() < deadline:
                if stop.is_set() or downloads.fenced.is_set():
                    break
                await asyncio.sleep(0.01)
            self._ready.set()
            if ready is not None:
                ready()
            await _first(stop, downloads.fenced)
        finally:
            if downloads.fenced.is_set():
                log.error("shutting down: this process may no longer download (see above)")
            else:
                log.info("shutting down: no new events; finishing the jobs in progress")
            for server, _task in servers:
                server.should_exit = True
            for _server, task in servers:
                with contextlib.suppress(Exception):
                    await task
            await asyncio.to_thread(committer.stop)
            work_stop.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _archived(self, archived: Archived) -> None:
        self.metrics.archived_one(archived.seconds, archived.queued_at, archived.at)
        if self._on_archived is not None:
            self._on_archived(archived)

    def _registry_entry(self, index: Index) -> PbxRecord:
        """The PBX's entry in the registry: the one named in the config, else the entry of
        the PBX the config gives (made or brought up to date now). StartError if the
        registry has no such name, or the config's settings are refused."""
        from callvault.index.pbxs import PbxRegistryError

        config = self.config
        try:
            if config.registry_name is not None:
                return index.pbxs.require(config.registry_name)
            return given_pbx_entry(
                index,
                url=config.pbx_url,
                username=config.username,
                api_version=config.api_version,
                tls=config.tls,
                timezone=config.timezone,
                workers=config.workers,
                events_allow=config.events_allow,
            )
        except PbxRegistryError as exc:
            raise StartError(str(exc)) from None

    def _serial_noting(
        self, committer: GroupCommitter, index: Index
    ) -> Callable[[CallDetail], Coroutine[Any, Any, RecordResult]]:
        """`committer.commit`, noting in the registry the serial the PBX's reports give
        (once per new value; the registry is not touched for every report)."""
        assert self.pbx is not None
        name = self.pbx.name
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

    async def _reconcile_loop(
        self,
        client: PbxClient,
        index: Index,
        pool: WorkerPool,
        session: PbxSession,
        stop: asyncio.Event,
    ) -> None:
        config = self.config
        cdr_export = client.api_version.has_cdr_export
        if not cdr_export:
            log.warning(
                "API %s has no CDR export: calls whose events are missed while serve is down "
                "are not found again (use API v1.1.0 or later if the firmware has it)",
                client.api_version.value,
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
                        tz=config.timezone,
                        on_queued=pool.wake,
                        cdr_export=cdr_export,
                        pbx_id=self.pbx.id if self.pbx is not None else 0,
                    )
                except Exception as exc:
                    log.warning(
                        "reconcile failed (next try in %.0f s): %s",
                        config.reconcile_interval_s,
                        exc,
                    )
            first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=config.reconcile_interval_s)


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
    """Run `start()` until `stop` is set; if it fails, log at ERROR (the traceback the first
    time) and start it again after a short delay. Its failures never go unnoticed."""
    failures = 0
    while not stop.is_set():
        try:
            await start()
            return
        except Exception as exc:
            delay = _RESTART_DELAYS_S[min(failures, len(_RESTART_DELAYS_S) - 1)]
            failures += 1
            log.error(
                "%s failed: %s: %s; starting it again in %.0f s",
                what,
                type(exc).__name__,
                exc,
                delay,
                exc_info=exc if failures == 1 else None,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
