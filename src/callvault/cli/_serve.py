"""``callvault serve`` and ``callvault backfill``: wiring of `callvault.archive`.

serve     runs the archiver until SIGTERM/SIGINT (then: stop accepting events, finish or
          release the downloads in progress, log out, exit 0). Its downloads run as a
          registered process of node --node (default the host name).
backfill  walks the CDR export over a date range in windows of at most a day, queues every
          recording not yet archived, and (unless --queue-only) downloads what is due
          (`callvault.archive.drain`: a job whose next attempt is more than a minute away
          is left to serve or the next run), then prints its summary line. Resumable and
          idempotent. SIGTERM/SIGINT: release the downloads in progress, log out, exit
          143/130.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
from sqlalchemy.exc import SQLAlchemyError

from callvault.archive import (
    NODE_KIND,
    AlertSettings,
    Archiver,
    ArchiverConfig,
    BackfillStats,
    Fenced,
    PbxTarget,
    PoolOptions,
    RegistryView,
    RetryPolicy,
    StartError,
    StorageMismatch,
    backfill,
    drain,
    given_pbx_entry,
    open_storage,
    save_pbx_timezone,
    storage_url_for,
)
from callvault.cli._app import app
from callvault.cli._common import (
    Terminated,
    cli_actor,
    counting_bar,
    fail,
    plural,
    run_service,
    run_terminable,
)
from callvault.cli._options import (
    PATH,
    PbxFlags,
    archive_option,
    config_option,
    db_option,
    flag,
    option,
    pbx_options,
    secure_cookies_option,
    storage_option,
    timezone_option,
    trusted_proxy_option,
)
from callvault.cli._settings import (
    USAGE_ERROR,
    ArchiveSettings,
    SettingsError,
    settings_or_fail,
)
from callvault.index import DEFAULT_STALE_AFTER, Index, IndexFailure, open_index
from callvault.index.pbxs import PbxRecord
from callvault.keys import Keyring
from callvault.pbx import (
    ApiVersion,
    AuthError,
    PbxBusy,
    PbxClient,
    PbxError,
    PbxTransportError,
    PSeriesClient,
)
from callvault.serving import ListenError
from callvault.storage import Storage
from callvault.times import FORMATS, TimeFormatError, parse_moment

log = logging.getLogger("callvault.archive")

events_listen_option = option(
    "--events-listen",
    metavar="HOST:PORT",
    help="Where the PBX's event reports arrive (plain HTTP) (default 0.0.0.0:8260).",
)
events_allow_option = option(
    "--events-allow",
    multiple=True,
    metavar="ADDR",
    help="Address or network allowed to post events (repeatable) (default the PBX's).",
)
workers_option = option(
    "--workers", type=int, metavar="N", help="Concurrent downloads (default 2)."
)
node_option = option(
    "--node",
    metavar="NAME",
    help="This machine's name among several sharing one index (default the host name).",
)
bind_option = option(
    "--bind",
    metavar="ADDRESS",
    help="This node's IP address: connections to the PBXs leave from it, and the events "
    "listener and web app listen on it unless --events-listen/--web-listen say otherwise.",
)
verbose_option = click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logging.")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("callvault")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # One line per archived recording comes from the archiver; the client's own per-file
    # line would double it.
    logging.getLogger("callvault.pbx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _require(settings: ArchiveSettings) -> tuple[str, str, Path]:
    try:
        pbx, username = settings.require_pbx()
        archive = settings.archive_dir()
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)
    return pbx, username, archive


def _policy(settings: ArchiveSettings) -> RetryPolicy:
    return RetryPolicy(
        not_found_schedule_s=tuple(settings.retry_schedule_s) or (60.0,),
        missing_after_s=settings.missing_after_s,
        missing_min_attempts=settings.missing_min_attempts,
        transient_base_s=settings.transient_backoff_s,
        transient_max_s=settings.transient_backoff_max_s,
        transient_max_attempts=settings.transient_max_attempts,
    )


def _refuse_flags_entry(record: Any) -> None:
    """Exit with one line if `record` is the archive's PBX of serve's flags: its password is
    not kept, so the registry alone cannot log in to it."""
    if record.given_by_flags:
        fail(
            f"PBX {record.name} is this archive's PBX of serve's flags: give them as before "
            "(--pbx, --username, --password-env), or keep its password sealed with "
            f"`callvault pbx edit {record.name} --url URL --password-env VAR`",
            code=USAGE_ERROR,
        )


def _named(settings: ArchiveSettings, only: Sequence[str]) -> tuple[str, ...]:
    """The registered PBXs to work on: `only` (--only), or the one --pbx names."""
    name = settings.pbx_name
    if name is None:
        return tuple(only)
    if only and tuple(only) != (name,):
        fail(f"--pbx {name} names a registered PBX: give it or --only, not both", code=2)
    return (name,)


def _registered(settings: ArchiveSettings, only: str | None) -> tuple[Any, Any]:
    """The registered PBX `serve` archives, and the keys that open its password: `only`,
    else the one there is; exits with one line when that cannot be told."""
    from callvault.index.pbxs import PbxRegistryError

    try:
        url = settings.db_url()
        settings.archive_dir()
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)
    try:
        with open_index(url) as index:
            records = index.pbxs.list()
            record = index.pbxs.require(only) if only is not None else None
    except IndexFailure as exc:
        fail(str(exc))
    except PbxRegistryError as exc:
        fail(str(exc), code=USAGE_ERROR)
    if record is None:
        if not records:
            fail(
                "no PBX given: register one with `callvault pbx add NAME --url ...`, or pass "
                "--pbx https://HOST:8088 (or set CALLVAULT_PBX)",
                code=USAGE_ERROR,
            )
        if len(records) > 1:
            names = ", ".join(r.name for r in records)
            fail(
                f"{len(records)} PBXs are registered ({names}): choose one with --only NAME",
                code=USAGE_ERROR,
            )
        record = records[0]
    _refuse_flags_entry(record)
    try:
        keyring = settings.keyring()
    except SettingsError as exc:
        fail(f"PBX {record.name}: its password is sealed: {exc}", code=USAGE_ERROR)
    return record, keyring


def _registered_all(
    settings: ArchiveSettings, only: Sequence[str]
) -> tuple[list[PbxTarget], dict[str, str]]:
    """The registered PBXs `serve` archives (`only`, else every one with its password
    sealed), ready to log in, and those left out with why: a PBX whose password the master
    keys loaded cannot open is left out (the archiver says so once, as for one added
    later: `ArchiverConfig.left_out`), unless it was named (`only`) or none can be opened;
    then, as for no PBX at all, serve exits with one line."""
    from callvault.index.pbxs import PbxRegistryError
    from callvault.keys import MasterKeyError

    if len(only) == 1:
        records = [_registered(settings, only[0])[0]]
    else:
        try:
            with open_index(settings.db_url()) as index:
                records = [index.pbxs.require(name) for name in dict.fromkeys(only)]
                registered = index.pbxs.list()
        except IndexFailure as exc:
            fail(str(exc))
        except PbxRegistryError as exc:
            fail(str(exc), code=USAGE_ERROR)
        if not only:
            records = [r for r in registered if not r.given_by_flags]
            skipped = [r.name for r in registered if r.given_by_flags]
            if not records:  # only the PBX of the flags, or none: say what to do
                records = [_registered(settings, None)[0]]
            elif skipped:
                print(
                    f"callvault: PBX {skipped[0]} is given by serve's flags: archive it with "
                    "a serve of its own (--pbx ...), or seal its password with `callvault "
                    f"pbx edit {skipped[0]} --url URL --password-env VAR`",
                    file=sys.stderr,
                )
        for record in records:
            _refuse_flags_entry(record)
    try:
        keyring = settings.keyring()
    except SettingsError as exc:
        fail(f"the registered PBXs' passwords are sealed: {exc}", code=USAGE_ERROR)
    targets = []
    left_out: dict[str, str] = {}
    for record in records:
        try:
            targets.append(_target_of(record, keyring, settings))
        except MasterKeyError as exc:
            if only:  # named: archiving it is what was asked
                fail(str(exc), code=USAGE_ERROR)
            left_out[record.name] = str(exc)
    if not targets:  # none can be opened: there is nothing to serve
        fail(next(iter(left_out.values())), code=USAGE_ERROR)
    return targets, left_out


def _target_of(record: PbxRecord, keyring: Keyring, settings: ArchiveSettings) -> PbxTarget:
    """How the archiver reaches a registered PBX; MasterKeyError if its password cannot
    be opened."""
    from callvault.ops import open_password, tls_options

    config = record.config
    return PbxTarget(
        pbx_url=config.url,
        username=config.username,
        password=open_password(record, keyring),
        registry_name=record.name,
        api_version=ApiVersion(config.api_version),
        kind=config.kind,
        tcp_report_port=config.tcp_report_port,
        tls=tls_options(config),
        timezone=settings.pbx_zone(record),
        workers=settings.workers if "workers" in settings.given else config.max_downloads,
        events_allow=list(config.events_allow) or None,
        revision=record.revision,
    )


def _registry_view(
    settings: ArchiveSettings, only: Sequence[str]
) -> Callable[[Index], RegistryView]:
    """What a running serve re-reads of the registry: the PBXs it archives (`only`, else
    every one with its password sealed), each ready to log in or with why it cannot."""
    from callvault.keys import MasterKeyError

    keyring = settings.keyring()  # already opened once at start: no error now
    names = set(only)

    def view(index: Index) -> RegistryView:
        found: dict[str, PbxTarget | str] = {}
        for record in index.pbxs.list():
            if record.given_by_flags or (names and record.name not in names):
                continue
            try:
                found[record.name] = _target_of(record, keyring, settings)
            except MasterKeyError as exc:
                found[record.name] = str(exc)
        return found

    return view


def archiver_config(
    settings: ArchiveSettings, *, web: bool, only: Sequence[str] = ()
) -> ArchiverConfig:
    """The service configuration from the settings (exits with one line on bad ones): the
    PBX the flags give (--pbx ...), else the registered ones (`only`, or every one)."""
    events_host, events_port = settings.events_address()
    web_host, web_port = settings.web_address()
    if settings.lease_renew_s >= settings.lease_ttl_s:
        fail(
            f"lease_renew_s ({settings.lease_renew_s:g}) must be shorter than lease_ttl_s "
            f"({settings.lease_ttl_s:g}): a node would lose its PBXs between two renewals",
            code=USAGE_ERROR,
        )
    registry_name = None
    more: tuple[PbxTarget, ...] = ()
    registry: Callable[[Index], RegistryView] | None = None
    revision: str | None = None
    left_out: dict[str, str] = {}
    if settings.pbx_url is None:
        named = _named(settings, only)
        (first, *rest), left_out = _registered_all(settings, named)
        more = tuple(rest)
        registry, revision = _registry_view(settings, named), first.revision
        pbx, username, password = first.pbx_url, first.username, first.password
        archive = settings.archive_dir()
        api, tls, zone, allowed = first.api_version, first.tls, first.timezone, first.events_allow
        workers, registry_name, kind = first.workers, first.registry_name, first.kind
        tcp_report_port = first.tcp_report_port
    else:
        if only:
            fail("give either --only NAME (a registered PBX) or --pbx URL, not both", code=2)
        pbx, username, archive = _require(settings)
        try:
            allowed = settings.allowed_event_sources() or None
            password = settings.password()
            tls = settings.tls_options()
        except SettingsError as exc:
            fail(str(exc), code=USAGE_ERROR)
        api, zone, workers, kind = settings.api, settings.tz, settings.workers, settings.kind
        tcp_report_port = None  # the PBX of the flags reports over HTTP
    return ArchiverConfig(
        pbx_url=pbx,
        username=username,
        password=password,
        archive=archive,
        storage_url=settings.storage,
        registry_name=registry_name,
        more_pbxs=more,
        db_url=settings.db_url(),
        api_version=api,
        kind=kind,
        tcp_report_port=tcp_report_port,
        tls=tls,
        events_host=events_host,
        events_port=events_port,
        events_allow=allowed,
        workers=workers,
        node=settings.node,
        bind=_local_address(settings.bind),
        alerts=_alerts(settings),
        checkpoint=_checkpoint(settings),
        retention=_retention_pass,
        registry=registry,
        registry_poll_s=settings.registry_poll_s,
        left_out=left_out,
        pbx_revision=revision,
        lease_ttl_s=settings.lease_ttl_s,
        lease_renew_s=settings.lease_renew_s,
        timezone=zone,
        reconcile_hours=float(settings.reconcile_hours),
        reconcile_interval_s=float(settings.reconcile_interval_s),
        heartbeat_interval_s=settings.heartbeat_interval_s,
        job_lease_s=settings.job_lease_s,
        poll_interval_s=settings.poll_interval_s,
        policy=_policy(settings),
        web_host=web_host if web else None,
        web_port=web_port if web else None,
        web_trusted_proxy=settings.trusted_proxy,
        encrypt=settings.encrypt,
        keyring=_encryption_keys(settings),
    )


def _encryption_keys(settings: ArchiveSettings) -> Keyring | None:
    """The master keys the workers seal new recordings' data keys with (with `encrypt`),
    or open those of encrypted copies already stored with; exits with one line when
    `encrypt` is on without a usable master key."""
    try:
        return settings.encryption() or settings.optional_keyring()
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)


def _checkpoint(settings: ArchiveSettings) -> Callable[[Index, datetime], None] | None:
    """What signs the audit chain's head on this node: the deployment's signing key,
    opened with the master key (None without one: another node, or `audit verify`, signs)."""
    try:
        keyring = settings.optional_keyring()
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)
    if keyring is None:
        return None

    def sign(index: Index, now: datetime) -> None:
        from callvault.ops import signer, write_checkpoint

        write_checkpoint(index, signer(index, keyring, now=now), now=now)

    return sign


def _retention_pass(index: Index, storage: Storage, now: datetime) -> None:
    """Serve's daily retention pass (see `callvault.ops.run_retention`), logged."""
    from callvault.ops import Archive, run_retention

    report = run_retention(Archive(index, storage), now=now)
    if report.deleted or report.purged or report.purge_failures:
        log.info("%s", report.summary())
    for failure in report.purge_failures:
        log.warning("not removed yet (tried again by the next pass): %s", failure)


def _alerts(settings: ArchiveSettings) -> AlertSettings | None:
    try:
        return settings.alert_settings()
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)


def _local_address(address: str | None) -> str | None:
    """`address` if this machine has it (exits with one line if not)."""
    if address is None:
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as exc:
        fail(
            f"--bind {address}: not an address of this machine ({exc.strerror or exc}); "
            "give one that `ip addr` lists",
            code=USAGE_ERROR,
        )
    return address


def _web_factory(settings: ArchiveSettings) -> Callable[..., Any] | None:
    try:
        from callvault.web import create_app
    except ImportError:
        return None
    try:
        keyring = settings.optional_keyring()  # for PBXs added in the web app
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)
    return functools.partial(create_app, secure_cookies=settings.secure_cookies, keyring=keyring)


@app.command("serve")
@config_option
@pbx_options
@archive_option
@db_option
@storage_option
@events_listen_option
@events_allow_option
@workers_option
@node_option
@bind_option
@timezone_option
@option(
    "--web-listen", metavar="HOST:PORT", help="Where the web app listens (default 127.0.0.1:8080)."
)
@click.option("--no-web", is_flag=True, default=False, help="Do not serve the web app.")
@secure_cookies_option
@trusted_proxy_option
@option(
    "--only",
    metavar="NAME",
    multiple=True,
    help="A registered PBX to archive (`callvault pbx add`; repeatable), when no --pbx is "
    "given (default: every one registered with its password).",
)
@option(
    "--master-key-file",
    type=PATH,
    metavar="FILE",
    help="File of master keys: they open the registered PBX's password, and seal those "
    "set in the web app (default: CALLVAULT_MASTER_KEY or CALLVAULT_MASTER_KEY_FILE).",
)
@option(
    "--reconcile-hours",
    type=int,
    metavar="N",
    help="Hours of CDR history reconciled (default 48).",
)
@flag(
    "--encrypt",
    help="Encrypt every recording archived from now on at rest, each under its own data "
    "key sealed with the master key (which must be set). Env CALLVAULT_ENCRYPT=1.",
)
@verbose_option
def serve_command(
    config: Path | None,
    pbx_flags: PbxFlags,
    archive: Path | None,
    db: str | None,
    storage: str | None,
    events_listen: str | None,
    events_allow: tuple[str, ...],
    workers: int | None,
    node: str | None,
    bind: str | None,
    timezone: str | None,
    web_listen: str | None,
    no_web: bool,
    secure_cookies: bool | None,
    trusted_proxy: str | None,
    only: tuple[str, ...],
    master_key_file: Path | None,
    reconcile_hours: int | None,
    encrypt: bool | None,
    verbose: bool,
) -> None:
    """Archive every recording as calls end: receive events, download, store, index.

    The PBX is the one --pbx (with --username, --password-env...) gives, else every PBX
    registered with `callvault pbx add` (or those named with --only): one events listener
    for all, each PBX with its own session, download workers and secret report path."""
    settings = settings_or_fail(
        config,
        **pbx_flags,
        archive=archive,
        db=db,
        storage=storage,
        events_listen=events_listen,
        events_allow=list(events_allow) or None,
        workers=workers,
        node=node,
        bind=bind,
        timezone=timezone,
        web_listen=web_listen,
        secure_cookies=secure_cookies,
        trusted_proxy=trusted_proxy,
        reconcile_hours=reconcile_hours,
        master_key_file=master_key_file,
        encrypt=encrypt,
    )
    factory = None if no_web else _web_factory(settings)
    service_config = archiver_config(settings, web=factory is not None, only=only)
    _setup_logging(verbose)
    try:
        archiver = Archiver(service_config, web_app_factory=factory)
    except StartError as exc:
        fail(str(exc))

    async def main(stop: asyncio.Event) -> None:
        def ready() -> None:
            web = (
                f"; web app on http://{service_config.web_host}:{archiver.web_port}/"
                if (archiver.web_port)
                else ""
            )
            what = service_config.pbx_url
            if service_config.more_pbxs:
                names = [service_config.registry_name or "main"] + [
                    t.registry_name or "main" for t in service_config.more_pbxs
                ]
                what = f"{len(names)} PBXs ({', '.join(names)})"
            log.info(
                "callvault serve: archiving %s into %s; events on %s:%s%s",
                what,
                service_config.archive,
                service_config.events_host,
                archiver.events_port,
                web,
            )

        await archiver.run(stop, ready=ready)

    try:
        run_service(main)
    except Terminated:  # a second SIGTERM or Ctrl-C: stopped at once
        raise SystemExit(143) from None
    except (StartError, ListenError, IndexFailure, Fenced) as exc:
        fail(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"cannot start: {where}{exc.strerror or exc}")


# -- backfill ------------------------------------------------------------------------------


def _time_option(flag: str, value: str, tz: tzinfo, *, end: bool) -> datetime:
    try:
        return parse_moment(value, tz, end=end, name=flag)
    except TimeFormatError as exc:
        fail(str(exc), code=USAGE_ERROR)


@app.command("backfill")
@option(
    "--since",
    required=True,
    metavar="TIME",
    help=f"Calls that started from this time, in the PBX's zone: {FORMATS}.",
)
@option(
    "--until",
    metavar="TIME",
    help=f"...and before this time (a date: through that day): {FORMATS}. Default: now.",
)
@click.option(
    "--queue-only", is_flag=True, default=False, help="Only queue; let `callvault serve` download."
)
@click.option(
    "--restart", is_flag=True, default=False, help="Ignore the progress of an earlier run."
)
@config_option
@pbx_options
@option(
    "--only",
    metavar="NAME",
    help="The registered PBX to backfill (`callvault pbx add`), when no --pbx is given "
    "(default: the only one registered).",
)
@option(
    "--master-key-file",
    type=PATH,
    metavar="FILE",
    help="File of master keys that open the registered PBX's password (default: "
    "CALLVAULT_MASTER_KEY or CALLVAULT_MASTER_KEY_FILE).",
)
@archive_option
@db_option
@storage_option
@workers_option
@node_option
@timezone_option
@flag(
    "--encrypt",
    help="Encrypt the recordings it downloads at rest, like serve --encrypt (needs the "
    "master key). Env CALLVAULT_ENCRYPT=1.",
)
@verbose_option
def backfill_command(
    since: str,
    until: str | None,
    queue_only: bool,
    restart: bool,
    config: Path | None,
    pbx_flags: PbxFlags,
    only: str | None,
    master_key_file: Path | None,
    archive: Path | None,
    db: str | None,
    storage: str | None,
    workers: int | None,
    node: str | None,
    timezone: str | None,
    encrypt: bool | None,
    verbose: bool,
) -> None:
    """Queue (and download) every recording of the CDR history in a date range.

    The PBX is the one --pbx (with --username, --password-env...) gives, else the one
    registered with `callvault pbx add` (--only NAME when there are several)."""
    settings = settings_or_fail(
        config,
        **pbx_flags,
        archive=archive,
        db=db,
        storage=storage,
        workers=workers,
        node=node,
        timezone=timezone,
        master_key_file=master_key_file,
        encrypt=encrypt,
    )
    _encryption_keys(settings)  # --encrypt without a master key: one line, before anything
    record = None
    if settings.pbx_url is None:
        named = _named(settings, () if only is None else (only,))
        record, _keyring = _registered(settings, named[0] if named else None)
        archive_dir = settings.archive_dir()
        api = ApiVersion(record.config.api_version)
        tz = settings.pbx_zone(record)
        pbx_url = record.config.url
    else:
        if only is not None:
            fail("give either --only NAME (a registered PBX) or --pbx URL, not both", code=2)
        pbx_url, _user, archive_dir = _require(settings)
        api, tz = settings.api, settings.tz
    if not api.has_cdr_export:
        # Before anything is made: the archive, the index, a login.
        fail(
            f"API {api.value} has no CDR export to backfill from (it came with "
            "v1.1.0): give --api-version v1.1.0 or later if the PBX's firmware has it",
            code=USAGE_ERROR,
        )
    try:
        client = settings.pbx_client(record)
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)
    start = _time_option("--since", since, tz, end=False)
    end = datetime.now(tz) if until is None else _time_option("--until", until, tz, end=True)
    if end <= start:
        fail("--until must be after --since", code=USAGE_ERROR)
    _setup_logging(verbose)
    if sys.stderr.isatty() and not verbose:
        logging.getLogger("callvault").setLevel(logging.WARNING)
    try:
        store = open_storage(archive_dir, settings.storage)  # the directory is usable
    except StartError as exc:
        fail(str(exc))
    try:
        index = open_index(settings.db_url())
    except IndexFailure as exc:
        fail(str(exc))
    try:
        where = storage_url_for(index, settings.storage, archive_dir, adopt=True)
        if where != settings.storage:  # the index knows where its recordings are
            store = open_storage(archive_dir, where)
    except (StartError, StorageMismatch) as exc:
        index.close()
        fail(str(exc))
    try:
        holder = _working_node(index, record.id) if record is not None else None
        if record is not None and holder is not None:
            # A serve node holds the PBX: it reads the history with its own session.
            code = _ask_the_node(index, record.name, record.id, holder, start, end)
            raise SystemExit(code)
        # `callvault list` shows times in the zone the PBX's local times were read in.
        save_pbx_timezone(index, tz)
        pbx_id = record.id if record is not None else _given_pbx_id(index, settings, client)
        code = run_terminable(
            _backfill(
                client,
                index,
                store,
                settings,
                tz=tz,
                pbx_url=pbx_url,
                pbx_id=pbx_id,
                start=start,
                end=end,
                queue_only=queue_only,
                resume=not restart,
            )
        )
    except KeyboardInterrupt:
        print(_STOPPED.format(how="interrupted"), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Terminated:
        print(_STOPPED.format(how="terminated"), file=sys.stderr, flush=True)
        raise SystemExit(143) from None
    except IndexFailure as exc:  # e.g. the index is damaged
        fail(f"backfill stopped: {exc}")
    except SQLAlchemyError as exc:
        # e.g. the database stayed locked past the busy timeout, or is read-only.
        detail = " ".join(str(getattr(exc, "orig", None) or type(exc).__name__).split())
        fail(f"backfill stopped: the index database failed: {detail} (run it again to resume)")
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"backfill stopped: {where}{exc.strerror or exc} (run it again to resume)")
    finally:
        index.close()
    raise SystemExit(code)


_STOPPED = "callvault: backfill {how}: no download left claimed, logged out; run it again to resume"

# How long a backfill asked of a node may wait for a node to take it up.
_UNCLAIMED_PATIENCE_S = 60.0


def _working_node(index: Index, pbx_id: int) -> str | None:
    """The live `serve` node that holds the PBX's lease now, if any."""
    now = datetime.now(UTC)
    lease = index.leases.get(pbx_id)
    if lease is None or lease.node is None or not lease.held(now):
        return None
    live = index.processes.live(now=now, stale_after=DEFAULT_STALE_AFTER)
    alive = {info.node for info in live if info.kind == NODE_KIND}
    return lease.node if lease.node in alive else None


def _ask_the_node(
    index: Index, name: str, pbx_id: int, node: str, start: datetime, end: datetime
) -> int:
    """Ask the node holding the PBX to backfill, and follow it until it is done: a second
    login from here might end the node's session (one token per user on some firmware)."""
    request = index.backfills.submit(
        pbx_id, since=start, until=end, by=cli_actor(), now=datetime.now(UTC)
    )
    print(
        f"backfill: PBX {name} is archived by node {node}: the backfill runs there, with its "
        f"session (request {request.id})",
        file=sys.stderr,
        flush=True,
    )
    waited_from = time.monotonic()
    try:
        with counting_bar() as progress:
            task = progress.add_task("CDR windows", total=None)
            while True:
                current = index.backfills.get(request.id)
                if current is None:
                    print("callvault: error: the backfill request was removed", file=sys.stderr)
                    return 1
                figures = current.progress
                progress.update(
                    task,
                    total=figures.get("windows") or None,
                    completed=figures.get("windows_done", 0),
                    description=f"CDR windows ({figures.get('queued', 0)} queued)",
                )
                if current.finished:
                    break
                if current.state == "running":
                    waited_from = time.monotonic()
                elif time.monotonic() - waited_from > _UNCLAIMED_PATIENCE_S:
                    progress.stop()
                    why = f" (last try: {current.error})" if current.error else ""
                    print(
                        f"callvault: error: no node has taken the backfill up for "
                        f"{_UNCLAIMED_PATIENCE_S:.0f} s{why}; it stays asked (request "
                        f"{request.id}) and runs when a node works on PBX {name}",
                        file=sys.stderr,
                    )
                    return 1
                time.sleep(1.0)
    except KeyboardInterrupt:
        print(
            f"callvault: backfill goes on on the node (request {request.id}); "
            "`callvault status` shows the recordings it queues",
            file=sys.stderr,
        )
        return 130
    figures = current.progress
    if current.state == "failed":
        print(
            f"callvault: error: backfill failed on node {current.node}: {current.error}",
            file=sys.stderr,
        )
        return 1
    skipped = int(figures.get("skipped", 0))
    print(
        f"backfill: {plural(int(figures.get('calls', 0)), 'call')} in "
        f"{plural(int(figures.get('windows', 0)), 'window')}{_skipped(skipped)}; "
        f"{plural(int(figures.get('queued', 0)), 'recording')} queued, downloaded by node "
        f"{current.node}",
        flush=True,
    )
    return 0


def _given_pbx_id(
    index: Index, settings: ArchiveSettings, client: PbxClient | PSeriesClient
) -> int:
    """The registry id of the PBX the flags give (its entry made if it has none)."""
    from callvault.index.pbxs import PbxRegistryError

    if isinstance(client, PbxClient):
        username, api_version = client.username, client.api_version
    else:
        username, api_version = client.client_id, settings.api
    try:
        entry = given_pbx_entry(
            index,
            url=client.base_url,
            username=username,
            api_version=api_version,
            tls=client.tls,
            timezone=settings.tz,
            workers=settings.workers,
            events_allow=settings.events_allow,
            kind=settings.kind,
        )
    except PbxRegistryError as exc:
        fail(str(exc), code=USAGE_ERROR)
    return entry.id


def _pool_options(settings: ArchiveSettings, pbx_id: int) -> PoolOptions:
    return PoolOptions(
        pbx_id=pbx_id,
        workers=settings.workers,
        lease_s=settings.job_lease_s,
        poll_interval_s=min(settings.poll_interval_s, 1.0),
        policy=_policy(settings),
        grace_s=_STOP_GRACE_S,
        encrypt=settings.encrypt,
        keyring=_encryption_keys(settings),
    )


async def _backfill(
    client: PbxClient | PSeriesClient,
    index: Index,
    storage: Storage,
    settings: ArchiveSettings,
    *,
    start: datetime,
    end: datetime,
    queue_only: bool,
    resume: bool,
    tz: ZoneInfo,
    pbx_url: str,
    pbx_id: int,
) -> int:
    failure: str | None = None
    try:
        async with client:
            try:
                await client.login()
            except PbxError as exc:
                print(f"callvault: error: {exc}", file=sys.stderr, flush=True)
                return 1
            with counting_bar() as progress:
                windows_task = progress.add_task("CDR windows", total=None)

                def on_window(_a: datetime, _b: datetime, stats: BackfillStats, total: int) -> None:
                    progress.update(
                        windows_task,
                        total=total,
                        completed=stats.windows + stats.windows_skipped,
                        description=f"CDR windows ({stats.queued} queued)",
                    )

                try:
                    stats = await backfill(
                        client,
                        index,
                        since=start,
                        until=end,
                        tz=tz,
                        pbx=pbx_url,
                        pbx_id=pbx_id,
                        resume=resume,
                        on_window=on_window,
                    )
                except PbxError as exc:
                    progress.stop()
                    # One line, never wrapped at the terminal's width; "resume" only where
                    # running it again can help (the network, the PBX, the password).
                    again = isinstance(exc, PbxTransportError | AuthError | PbxBusy)
                    hint = " (run it again to resume)" if again else ""
                    print(f"callvault: error: backfill stopped: {exc}{hint}", file=sys.stderr)
                    return 1
                if queue_only:
                    progress.stop()
                    print(
                        f"backfill: {plural(stats.calls, 'call')} in "
                        f"{plural(stats.windows, 'window')} "
                        f"({stats.windows_skipped} already done){_skipped(stats.skipped)}; "
                        f"{plural(stats.queued, 'recording')} queued for `callvault serve`",
                        flush=True,
                    )
                    return 0
                recordings_task = progress.add_task("recordings", total=None)

                def on_progress(done: int, total: int) -> None:
                    progress.update(recordings_task, total=total, completed=done)

                result = await drain(
                    index,
                    storage,
                    client,
                    tz=tz,
                    node=settings.node,
                    options=_pool_options(settings, pbx_id),
                    on_progress=on_progress,
                )
                failure = result.stopped
    except PbxError as exc:  # logout trouble on the way out
        log.debug("logout: %s", exc)
    if failure is not None:
        print(f"callvault: error: downloads stopped: {failure}", file=sys.stderr, flush=True)
    counts = await asyncio.to_thread(index.recordings.counts_by_state)
    print(
        f"backfill: {stats.calls} calls{_skipped(stats.skipped)}, {stats.queued} recordings "
        "queued; archive now: "
        f"{counts['archived']} archived, {counts['missing']} missing, {counts['failed']} failed, "
        f"{counts['pending'] + counts['downloading']} waiting",
        flush=True,
    )
    return 1 if counts["failed"] or failure is not None else 0


_STOP_GRACE_S = 5.0


def _skipped(rows: int) -> str:
    if not rows:
        return ""
    return f" ({rows} invalid CDR row{'s' if rows != 1 else ''} skipped, see the log)"
