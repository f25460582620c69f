"""`callvault simulate`: run the PBX simulator (or a fleet of them, `--pbxs N`) until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from callvault.cli._app import app
from callvault.cli._common import Terminated, command_name, fail, run_service
from callvault.pbx import CallDetail
from callvault.simulator import (
    PSeriesConfig,
    PSeriesFaults,
    PSeriesSimulator,
    Simulator,
    SimulatorConfig,
    fault_names,
    parse_faults,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    CallListener = Callable[[CallDetail], None]

# Simulated PBXs in one process: each is an HTTPS server on its own thread.
MAX_FLEET = 500
S_SERIES_SERIAL = "369351034049"
P_SERIES_SERIAL = "3631A2124001"
SECRET_FILE = "client-secret"  # noqa: S105 (a file name)


def _print(text: str = "") -> None:
    print(text, flush=True)


def _describe_call(cdr: CallDetail) -> str:
    what = f"recording {cdr.recording}" if cdr.recording else "no recording"
    return (
        f"call {cdr.callid} {cdr.type} {cdr.callfrom} -> {cdr.callto} {cdr.status}, "
        f"{cdr.talkduration}s talk, {what}"
    )


def _banner(sim: Simulator, password_given: bool) -> None:
    _print(f"callvault simulator: Yeastar S-Series PBX, serial {sim.serial}")
    versions = "/api/v1.0.1, /api/v1.1.0 (or /api/v1.10), /api/v2.0.0"
    _print(f"  URL          {sim.url}   (API under {versions})")
    _print(f"  username     {sim.username}")
    _print(f"  password     {'(as given)' if password_given else sim.password}")
    if sim.cert_sha256 is not None:
        _print(f"  certificate  SHA-256 {sim.cert_sha256}")
        _print(f"  CA file      {sim.ca_file}")
    else:
        _print("  certificate  none (plain HTTP)")
    _print(f"  recordings   {sim.recordings_dir}")
    _print(f"  time zone    {sim.config.timezone}   (give `callvault serve --timezone` the same)")
    names = sim.recording_names()
    if names:
        trust = f" --pin-sha256 {sim.cert_sha256}" if sim.cert_sha256 else ""
        secret = "'…'" if password_given else shlex.quote(sim.password)
        _print("Fetch a recording from another terminal:")
        _print(
            f"  CALLVAULT_PASSWORD={secret} {command_name()} fetch --pbx {sim.url} "
            f"--username {shlex.quote(sim.username)} --password-env CALLVAULT_PASSWORD"
            f"{trust} --out ./recordings {shlex.quote(names[-1])}"
        )
    _print("Serving until Ctrl-C.")


def _run(
    configs: list[SimulatorConfig], *, password_given: bool, initial_calls: int, as_json: bool
) -> None:
    """Set up and start the simulators, print their details, serve until SIGINT/SIGTERM."""
    sims: list[Simulator] = []
    try:
        for config in configs:
            try:
                sims.append(Simulator(config))
            except Exception as exc:  # bad time zone, unwritable data directory
                fail(f"cannot set up the simulator: {exc}")
        for sim in sims:
            try:
                sim.start()
            except OSError as exc:
                fail(
                    f"cannot listen on {sim.config.host}:{sim.config.port}: "
                    f"{exc.strerror or exc}; choose another --port"
                )
            except RuntimeError as exc:
                fail(str(exc))
        for sim in sims:
            for _ in range(initial_calls):
                sim.place_random_call(answered=True)
        fleet = len(sims) > 1

        def announcer(name: str) -> CallListener:
            def announce(cdr: CallDetail) -> None:
                if as_json:
                    line: dict[str, str | None] = {"call": cdr.callid, "recording": cdr.recording}
                    if fleet:
                        line = {"pbx": name, **line}
                    _print(json.dumps(line))
                else:
                    _print((f"[{name}] " if fleet else "") + _describe_call(cdr))

            return announce

        def ready() -> None:
            if fleet:
                _introduce_fleet(sims, password_given=password_given, as_json=as_json)
            else:
                _introduce(sims[0], password_given=password_given, as_json=as_json)
            for number, sim in enumerate(sims, 1):
                sim.add_call_listener(announcer(fleet_name(number)))

        # SIGTERM and Ctrl-C both stop it (handled explicitly: a shell may start background
        # jobs with SIGINT ignored).
        if not run_service(lambda stop: _watch(sims, stop), ready=ready):
            fail("a simulator stopped unexpectedly")
    except Terminated:
        pass
    finally:
        for sim in sims:
            sim.stop()


def fleet_name(number: int) -> str:
    """The name a simulated PBX of a fleet is shown under (and suggested for the registry)."""
    return f"sim-{number}"


def _details(sim: Simulator, *, password_given: bool) -> dict[str, object]:
    return {
        "url": sim.url,
        "username": sim.username,
        "password": None if password_given else sim.password,
        "cert_sha256": sim.cert_sha256,
        "ca_file": str(sim.ca_file) if sim.ca_file else None,
        "recordings": sim.recording_names(),
        "serial": sim.serial,
        "timezone": sim.config.timezone,
    }


def _introduce(sim: Simulator, *, password_given: bool, as_json: bool) -> None:
    """What the simulator is and how to reach it, and the calls placed so far."""
    if not as_json:
        _banner(sim, password_given=password_given)
        for cdr in sim.state.cdrs():
            _print(_describe_call(cdr))
        return
    _print(json.dumps(_details(sim, password_given=password_given)))


def _introduce_fleet(sims: list[Simulator], *, password_given: bool, as_json: bool) -> None:
    """The simulated PBXs: one JSON list (each with its `name`), or a table and how to
    register one of them."""
    if as_json:
        _print(
            json.dumps(
                [
                    {"name": fleet_name(number), **_details(sim, password_given=password_given)}
                    for number, sim in enumerate(sims, 1)
                ]
            )
        )
        return
    _print(f"callvault simulator: {len(sims)} Yeastar S-Series PBXs")
    _print(f"  {'NAME':<8} {'URL':<28} {'SERIAL':<14} {'PASSWORD':<24} CERTIFICATE SHA-256")
    for number, sim in enumerate(sims, 1):
        password = "(as given)" if password_given else sim.password
        _print(
            f"  {fleet_name(number):<8} {sim.url:<28} {sim.serial:<14} {password:<24} "
            f"{sim.cert_sha256 or '(plain HTTP)'}"
        )
    first = sims[0]
    trust = f" --pin-sha256 {first.cert_sha256}" if first.cert_sha256 else ""
    secret = "'…'" if password_given else shlex.quote(first.password)
    _print("Register one in an archive from another terminal:")
    _print(
        f"  PBX_PASSWORD={secret} {command_name()} pbx add {fleet_name(1)} --url {first.url} "
        f"--username {shlex.quote(first.username)} --password-env PBX_PASSWORD{trust} "
        f"--timezone {first.config.timezone} --archive DIR"
    )
    _print("Serving until Ctrl-C.")


async def _watch(sims: list[Simulator], stop: asyncio.Event) -> bool:
    """Until `stop` is set (True), or a simulator stops by itself (False)."""
    while not stop.is_set():
        if not all(sim.running for sim in sims):
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
    return True


@app.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=int, default=8088, show_default=True, help="Port to listen on (0: any free)."
)
@click.option("--http", is_flag=True, default=False, help="Plain HTTP instead of HTTPS.")
@click.option("--username", default="api", show_default=True, help="API username.")
@click.option(
    "--password",
    envvar="CALLVAULT_SIM_PASSWORD",
    default=None,
    help="API password (default: a random one, printed at start). Env CALLVAULT_SIM_PASSWORD.",
)
@click.option(
    "--calls-per-minute",
    type=float,
    default=0.0,
    metavar="N",
    help="Place random calls in the background at this average rate (default 0: none).",
)
@click.option(
    "--initial-calls",
    type=int,
    default=3,
    show_default=True,
    metavar="N",
    help="Recorded calls placed at start, so there is something to fetch.",
)
@click.option(
    "--fault",
    multiple=True,
    metavar="KEY[=VALUE]",
    help=(
        f"Switch a fault on (repeatable). Keys: {', '.join(fault_names())}. "
        "Recording names and numbers are digits only, as on real PBXs, unless "
        "names_with_plus, names_with_spaces or names_non_ascii puts a +, a space or "
        "non-ASCII letters in them (the download's file name header then carries "
        "raw UTF-8, or Latin-1 with disposition_latin1)."
    ),
)
@click.option("--seed", type=int, default=None, help="Seed for reproducible calls and faults.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Keep recordings and the certificate here (default: a temporary directory).",
)
@click.option(
    "--timezone",
    default="Europe/Berlin",
    show_default=True,
    metavar="ZONE",
    help="The PBX's time zone.",
)
@click.option(
    "--serial",
    default=None,
    help=f"The PBX serial number (sn). Default: {S_SERIES_SERIAL} "
    f"(--kind p-series: {P_SERIES_SERIAL}).",
)
@click.option(
    "--legacy-tls",
    is_flag=True,
    default=False,
    help="Also accept TLS 1.0/1.1 (the PBX's 'Low' security level).",
)
@click.option(
    "--call-progress/--no-call-progress",
    default=True,
    help=(
        "Push each call's progress reports before its NewCdr (ALERT, RING, ANSWER, "
        "ANSWERED, BYE, CallFailed, ExtensionStatus; CallStatus in format 2.0.0), "
        "as a PBX with status monitoring does (default: on)."
    ),
)
@click.option(
    "--pbxs",
    type=click.IntRange(1, MAX_FLEET),
    default=1,
    show_default=True,
    metavar="N",
    help="Run N independent PBXs (sim-1 ... sim-N): each on its own port (--port, the next "
    "ones, or any free with --port 0), with its own serial (counting up from --serial), "
    f"password, recordings, clock and faults. At most {MAX_FLEET}.",
)
@click.option(
    "--kind",
    type=click.Choice(["s-series", "cloud", "p-series"]),
    default="s-series",
    show_default=True,
    help="Which PBX to simulate: the S-Series API; cloud, the S-Series-based Yeastar Cloud "
    "PBX (its login also answers a refresh token, and a token ends 30 minutes after it was "
    "issued unless renewed); or the P-Series OpenAPI (tokens, recording/CDR lists, "
    "WebSocket events; --fault takes the P-Series fault names there).",
)
@click.option(
    "--client-id",
    default="callvault",
    show_default=True,
    help="--kind p-series: the API application's Client ID.",
)
@click.option(
    "--client-secret",
    envvar="CALLVAULT_SIM_CLIENT_SECRET",
    default=None,
    help="--kind p-series: the Client Secret (default: a random one, written to "
    f"DATA_DIR/{SECRET_FILE}). Env CALLVAULT_SIM_CLIENT_SECRET.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    help="Print the connection details as JSON (a list of them with --pbxs).",
)
def simulate(
    host: str,
    port: int,
    http: bool,
    username: str,
    password: str | None,
    calls_per_minute: float,
    initial_calls: int,
    fault: tuple[str, ...],
    seed: int | None,
    data_dir: Path | None,
    timezone: str,
    serial: str | None,
    legacy_tls: bool,
    call_progress: bool,
    pbxs: int,
    kind: str,
    client_id: str,
    client_secret: str | None,
    as_json: bool,
) -> None:
    """Run a simulated Yeastar S-Series (or P-Series) PBX until Ctrl-C: the API,
    recordings, events, faults."""
    if kind == "p-series":
        if pbxs > 1 or legacy_tls or calls_per_minute > 0:
            fail("--pbxs, --legacy-tls and --calls-per-minute are for --kind s-series only")
        if initial_calls < 0:
            fail("--initial-calls must not be negative")
        _simulate_pseries(
            PSeriesConfig(
                host=host,
                port=port,
                tls=not http,
                client_id=client_id,
                client_secret=client_secret,
                serial=serial or P_SERIES_SERIAL,
                timezone=timezone,
                seed=seed,
                faults=_pseries_faults(list(fault)),
                call_status_events=call_progress,
            ),
            data_dir=data_dir,
            initial_calls=initial_calls,
            as_json=as_json,
        )
        return
    serial = serial or S_SERIES_SERIAL
    try:
        faults = parse_faults(list(fault))
    except ValueError as exc:
        fail(str(exc))
    if initial_calls < 0:
        fail("--initial-calls must not be negative")
    # The temporary data directory is made here, not by the Simulator, so that it is
    # removed on every way out: a failed set-up or start included, not only sim.stop().
    own_dir: Path | None = None
    if data_dir is None:
        try:
            own_dir = Path(tempfile.mkdtemp(prefix="callvault-sim-"))
        except OSError as exc:
            fail(f"cannot create a temporary directory: {exc.strerror or exc}")
    if pbxs > 1 and not (serial.isdigit() and len(serial) <= 18):
        fail("--serial must be digits when --pbxs runs several (their serials count up)")
    if pbxs > 1 and port and port + pbxs - 1 > 65535:
        fail(f"--port {port} leaves no room for {pbxs} PBXs; choose a lower one or --port 0")
    try:
        root = own_dir or data_dir
        configs = [
            SimulatorConfig(
                kind=kind,
                host=host,
                port=port + number if port else 0,
                tls=not http,
                username=username,
                password=password,
                serial=str(int(serial) + number).zfill(len(serial)) if pbxs > 1 else serial,
                timezone=timezone,
                data_dir=(root / fleet_name(number + 1)) if pbxs > 1 and root else root,
                calls_per_minute=max(calls_per_minute, 0.0),
                seed=None if seed is None else seed + number,
                faults=faults,
                legacy_tls=legacy_tls,
                call_progress_reports=call_progress,
            )
            for number in range(pbxs)
        ]
        _run(
            configs,
            password_given=password is not None,
            initial_calls=initial_calls,
            as_json=as_json,
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    print("simulator stopped", file=sys.stderr, flush=True)


def _pseries_faults(items: list[str]) -> PSeriesFaults:
    """``--fault KEY[=VALUE]`` for the P-Series simulator: KEY a PSeriesFaults field; a bare
    KEY means 1 (counters), True (switches)."""
    faults = PSeriesFaults()
    kinds = {f.name: type(getattr(faults, f.name)) for f in dataclasses.fields(faults)}
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip()
        if key not in kinds:
            fail(f"unknown P-Series fault {key!r}; known: {', '.join(sorted(kinds))}")
        kind = kinds[key]
        try:
            value: object
            if kind is bool:
                value = raw.strip().lower() not in ("0", "false", "no", "off")
            elif kind is int:
                value = int(raw) if raw.strip() else 1
            else:
                value = float(raw)
        except ValueError:
            fail(f"--fault {key}: not a number: {raw!r}")
        setattr(faults, key, value)
    return faults


def _simulate_pseries(
    config: PSeriesConfig, *, data_dir: Path | None, initial_calls: int, as_json: bool
) -> None:
    """Run one simulated P-Series PBX until SIGINT/SIGTERM; the generated Client Secret is
    written to a file (mode 0600) in its data directory, and only that file is named."""
    own_dir: Path | None = None
    if data_dir is None:
        try:
            own_dir = Path(tempfile.mkdtemp(prefix="callvault-psim-"))
        except OSError as exc:
            fail(f"cannot create a temporary directory: {exc.strerror or exc}")
    root = own_dir or data_dir
    assert root is not None
    secret_given = config.client_secret is not None
    sim: PSeriesSimulator | None = None
    try:
        try:
            sim = PSeriesSimulator(dataclasses.replace(config, data_dir=root))
            secret_file = root / SECRET_FILE
            if not secret_given:
                fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(sim.client_secret + "\n")
            sim.start()
        except OSError as exc:
            fail(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}; "
                "choose another --port"
            )
        except (RuntimeError, ValueError) as exc:
            fail(f"cannot set up the simulator: {exc}")
        for _ in range(initial_calls):
            sim.place_call()
        running = sim

        def ready() -> None:
            _introduce_pseries(
                running, secret_file=None if secret_given else secret_file, as_json=as_json
            )

        async def watch(stop: asyncio.Event) -> bool:
            while not stop.is_set():
                if not running.running:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
            return True

        if not run_service(watch, ready=ready):
            fail("the simulator stopped unexpectedly")
    except Terminated:
        pass
    finally:
        if sim is not None:
            sim.stop()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    print("simulator stopped", file=sys.stderr, flush=True)


def _introduce_pseries(sim: PSeriesSimulator, *, secret_file: Path | None, as_json: bool) -> None:
    """How to reach the P-Series simulator; never the secret itself, only where it is."""
    if as_json:
        details = {
            "kind": "p-series",
            "url": sim.url,
            "client_id": sim.client_id,
            "client_secret_file": str(secret_file) if secret_file else None,
            "cert_sha256": sim.cert_sha256,
            "ca_file": str(sim.ca_file) if sim.ca_file else None,
            "recordings": sim.recording_names(),
            "serial": sim.serial,
            "timezone": sim.config.timezone,
        }
        _print(json.dumps(details))
        return
    _print(f"callvault simulator: Yeastar P-Series PBX (OpenAPI), serial {sim.serial}")
    _print(f"  URL            {sim.url}   (API under /openapi/v1.0, events wss .../subscribe)")
    _print(f"  client id      {sim.client_id}")
    where = f"in {secret_file} (mode 0600)" if secret_file else "(as given)"
    _print(f"  client secret  {where}")
    if sim.cert_sha256 is not None:
        _print(f"  certificate    SHA-256 {sim.cert_sha256}")
        _print(f"  CA file        {sim.ca_file}")
    else:
        _print("  certificate    none (plain HTTP)")
    _print(f"  recordings     {sim.recordings_dir}")
    _print(f"  time zone      {sim.config.timezone}")
    for name in sim.recording_names():
        _print(f"  recording {name}")
    trust = f" --pin-sha256 {sim.cert_sha256}" if sim.cert_sha256 else ""
    secret = f'"$(cat {shlex.quote(str(secret_file))})"' if secret_file else "'…'"
    _print("Register it in an archive from another terminal:")
    _print(
        f"  PBX_SECRET={secret} {command_name()} pbx add sim-p --url {sim.url} "
        f"--kind p-series --client-id {shlex.quote(sim.client_id)} --secret-env PBX_SECRET"
        f"{trust} --timezone {sim.config.timezone} --archive DIR"
    )
    _print("Serving until Ctrl-C.")
