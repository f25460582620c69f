"""`callvault simulate`: run the PBX simulator (or a fleet of them, `--pbxs N`, each of its
own kind if `--kind` lists them) until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import click

from callvault.cli._app import app
from callvault.cli._common import Terminated, command_name, fail, run_service
from callvault.pbx import CallDetail
from callvault.simulator import (
    Faults,
    PSeriesCall,
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

# Simulated PBXs in one process: each is an HTTPS server on its own thread.
MAX_FLEET = 500
KINDS = ("s-series", "cloud", "p-series")
KIND_NAMES = {
    "s-series": "Yeastar S-Series",
    "cloud": "Yeastar Cloud",
    "p-series": "Yeastar P-Series",
}
S_SERIES_SERIAL = "369351034049"
P_SERIES_SERIAL = "3631A2124001"
SECRET_FILE = "client-secret"  # noqa: S105 (a file name)

_print_lock = threading.Lock()


def _print(text: str = "") -> None:
    # Calls are announced from the simulators' threads too: one line at a time.
    with _print_lock:
        print(text, flush=True)


@dataclasses.dataclass
class _Pbx:
    """One simulated PBX of the run: its name (in a fleet), its simulator, the file its
    generated Client Secret is in (P-Series; None when --client-secret gave it) and, when
    the CLI places its calls (P-Series with --calls-per-minute), when the next one is due."""

    name: str
    sim: Simulator | PSeriesSimulator
    secret_file: Path | None = None
    next_call: float = math.inf

    @property
    def kind(self) -> str:
        return "p-series" if isinstance(self.sim, PSeriesSimulator) else self.sim.config.kind


def _describe_call(cdr: CallDetail) -> str:
    what = f"recording {cdr.recording}" if cdr.recording else "no recording"
    return (
        f"call {cdr.callid} {cdr.type} {cdr.callfrom} -> {cdr.callto} {cdr.status}, "
        f"{cdr.talkduration}s talk, {what}"
    )


def _describe_pseries_call(call: PSeriesCall) -> str:
    what = f"recording {call.file}" if call.file else "no recording"
    return (
        f"call {call.call_id} {call.type} {call.call_from} -> {call.call_to} {call.status}, "
        f"{call.talk_duration}s talk, {what}"
    )


def _banner(sim: Simulator, password_given: bool) -> None:
    _print(f"callvault simulator: {KIND_NAMES[sim.config.kind]} PBX, serial {sim.serial}")
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
            f"  CALLVAULT_PASSWORD={secret} {command_name()} fetch"
            f"{' --kind cloud' if sim.config.kind == 'cloud' else ''} --pbx {sim.url} "
            f"--username {shlex.quote(sim.username)} --password-env CALLVAULT_PASSWORD"
            f"{trust} --out ./recordings {shlex.quote(names[-1])}"
        )
    _print("Serving until Ctrl-C.")


def _run(
    configs: list[SimulatorConfig | PSeriesConfig],
    *,
    initial_calls: int,
    calls_per_minute: float,
    as_json: bool,
) -> None:
    """Set up and start the simulators (one per config, of its kind), print their details,
    serve until SIGINT/SIGTERM. Random calls (`calls_per_minute` on each) begin once the
    details are printed."""
    fleet = len(configs) > 1
    pbxs: list[_Pbx] = []
    try:
        for number, config in enumerate(configs, 1):
            try:
                sim = (
                    PSeriesSimulator(config)
                    if isinstance(config, PSeriesConfig)
                    else Simulator(config)
                )
            except Exception as exc:  # bad time zone, unwritable data directory
                fail(f"cannot set up the simulator: {exc}")
            pbxs.append(_Pbx(fleet_name(number), sim))
            if isinstance(sim, PSeriesSimulator) and sim.config.client_secret is None:
                pbxs[-1].secret_file = _write_secret(sim)
        for pbx in pbxs:
            try:
                pbx.sim.start()
            except OSError as exc:
                config = pbx.sim.config
                fail(
                    f"cannot listen on {config.host}:{config.port}: "
                    f"{exc.strerror or exc}; choose another --port"
                )
            except RuntimeError as exc:
                fail(str(exc))
        for pbx in pbxs:
            for _ in range(initial_calls):
                pbx.sim.place_random_call(answered=True)

        def announce(pbx: _Pbx, call_id: str, recording: str | None, text: str) -> None:
            if as_json:
                line: dict[str, str | None] = {"call": call_id, "recording": recording}
                _print(json.dumps({"pbx": pbx.name, **line} if fleet else line))
            else:
                _print((f"[{pbx.name}] " if fleet else "") + text)

        def announcer(pbx: _Pbx) -> Callable[[CallDetail], None]:
            return lambda cdr: announce(pbx, cdr.callid, cdr.recording, _describe_call(cdr))

        def announce_pseries(pbx: _Pbx, call: PSeriesCall) -> None:
            announce(pbx, call.call_id, call.file, _describe_pseries_call(call))

        def ready() -> None:
            if fleet:
                _introduce_fleet(pbxs, as_json=as_json)
            elif isinstance(pbxs[0].sim, PSeriesSimulator):
                _introduce_pseries(pbxs[0].sim, secret_file=pbxs[0].secret_file, as_json=as_json)
            else:
                _introduce(pbxs[0].sim, as_json=as_json)
            for pbx in pbxs:
                if isinstance(pbx.sim, Simulator):  # places its own calls, on its clock
                    pbx.sim.add_call_listener(announcer(pbx))
                    # Only now: the details list the initial calls only, and every later
                    # call is announced (its timer reads the rate as it goes).
                    pbx.sim.config.calls_per_minute = calls_per_minute

        async def watch(stop: asyncio.Event) -> bool:
            return await _watch(
                pbxs, stop, calls_per_minute=calls_per_minute, on_call=announce_pseries
            )

        # SIGTERM and Ctrl-C both stop it (handled explicitly: a shell may start background
        # jobs with SIGINT ignored).
        if not run_service(watch, ready=ready):
            fail("a simulator stopped unexpectedly")
    except Terminated:
        pass
    finally:
        for pbx in pbxs:
            pbx.sim.stop()


def _write_secret(sim: PSeriesSimulator) -> Path:
    """Write the generated Client Secret to a file (mode 0600) in the simulator's data
    directory, where only its owner can read it; the secret itself is never printed."""
    secret_file = sim.data_dir / SECRET_FILE
    try:
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(sim.client_secret + "\n")
    except OSError as exc:
        fail(f"cannot write the Client Secret to {secret_file}: {exc.strerror or exc}")
    return secret_file


def fleet_name(number: int) -> str:
    """The name a simulated PBX of a fleet is shown under (and suggested for the registry)."""
    return f"sim-{number}"


def _details(sim: Simulator) -> dict[str, object]:
    return {
        "kind": sim.config.kind,
        "url": sim.url,
        "username": sim.username,
        "password": None if sim.config.password is not None else sim.password,
        "cert_sha256": sim.cert_sha256,
        "ca_file": str(sim.ca_file) if sim.ca_file else None,
        "recordings": sim.recording_names(),
        "serial": sim.serial,
        "timezone": sim.config.timezone,
    }


def _pseries_details(sim: PSeriesSimulator, secret_file: Path | None) -> dict[str, object]:
    """Never the secret itself, only the file it is in (None: it was given)."""
    return {
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


def _introduce(sim: Simulator, *, as_json: bool) -> None:
    """What the simulator is and how to reach it, and the calls placed so far."""
    if not as_json:
        _banner(sim, password_given=sim.config.password is not None)
        for cdr in sim.state.cdrs():
            _print(_describe_call(cdr))
        return
    _print(json.dumps(_details(sim)))


def _introduce_fleet(pbxs: list[_Pbx], *, as_json: bool) -> None:
    """The simulated PBXs: one JSON list (each with its `name` and `kind`), or a table and
    how to register one of each kind."""
    if as_json:
        _print(
            json.dumps(
                [
                    {
                        "name": pbx.name,
                        **(
                            _pseries_details(pbx.sim, pbx.secret_file)
                            if isinstance(pbx.sim, PSeriesSimulator)
                            else _details(pbx.sim)
                        ),
                    }
                    for pbx in pbxs
                ]
            )
        )
        return
    kinds = Counter(pbx.kind for pbx in pbxs)
    if len(kinds) == 1:
        _print(f"callvault simulator: {len(pbxs)} {KIND_NAMES[pbxs[0].kind]} PBXs")
    else:
        counts = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        _print(f"callvault simulator: {len(pbxs)} Yeastar PBXs ({counts})")
    _print(
        f"  {'NAME':<8} {'KIND':<9} {'URL':<28} {'SERIAL':<14} {'CERTIFICATE SHA-256':<64} "
        "CREDENTIALS"
    )
    for pbx in pbxs:
        sim = pbx.sim
        if isinstance(sim, PSeriesSimulator):
            where = f"in {pbx.secret_file}" if pbx.secret_file else "(as given)"
            credentials = f"client {sim.client_id}, secret {where}"
        else:
            given = sim.config.password is not None
            credentials = f"user {sim.username}, password {'(as given)' if given else sim.password}"
        _print(
            f"  {pbx.name:<8} {pbx.kind:<9} {sim.url:<28} {sim.serial:<14} "
            f"{sim.cert_sha256 or '(plain HTTP)':<64} {credentials}"
        )
    _print(
        ("Register one" if len(kinds) == 1 else "Register them, e.g. one of each kind,")
        + f" in an archive from another terminal ({_MASTER_KEY_HINT}):"
    )
    for kind in kinds:
        first = next(pbx for pbx in pbxs if pbx.kind == kind)
        _print(f"  {_register_command(first)}")
    _print("Serving until Ctrl-C.")


# `pbx add` seals the password with the archive's master key: say how to have one.
_MASTER_KEY_HINT = (
    "first make a master key: callvault keys create --file KEY, "
    "and export CALLVAULT_MASTER_KEY_FILE=KEY"
)


def _register_command(pbx: _Pbx) -> str:
    """The `callvault pbx add` command that registers `pbx` in an archive."""
    sim = pbx.sim
    trust = f" --pin-sha256 {sim.cert_sha256}" if sim.cert_sha256 else ""
    where = f"--url {sim.url}{'' if pbx.kind == 's-series' else f' --kind {pbx.kind}'}"
    if isinstance(sim, PSeriesSimulator):
        file = pbx.secret_file
        secret = f'"$(cat {shlex.quote(str(file))})"' if file else "'…'"
        return (
            f"PBX_SECRET={secret} {command_name()} pbx add {pbx.name} {where} "
            f"--client-id {shlex.quote(sim.client_id)} --secret-env PBX_SECRET"
            f"{trust} --timezone {sim.config.timezone} --archive DIR"
        )
    password = "'…'" if sim.config.password is not None else shlex.quote(sim.password)
    return (
        f"PBX_PASSWORD={password} {command_name()} pbx add {pbx.name} {where} "
        f"--username {shlex.quote(sim.username)} --password-env PBX_PASSWORD{trust} "
        f"--timezone {sim.config.timezone} --archive DIR"
    )


def _pause(sim: PSeriesSimulator, calls_per_minute: float) -> float:
    """Seconds until the next random call: exponential, `calls_per_minute` on average."""
    with sim.state.lock:
        return sim.state.rng.expovariate(calls_per_minute / 60.0)


async def _watch(
    pbxs: list[_Pbx],
    stop: asyncio.Event,
    *,
    calls_per_minute: float,
    on_call: Callable[[_Pbx, PSeriesCall], None],
) -> bool:
    """Until `stop` is set (True), or a simulator stops by itself (False).

    Meanwhile it places the random calls of `calls_per_minute` on the P-Series simulators,
    which have no timer of their own (an S-Series simulator places its own, on its clock),
    and tells `on_call` of each."""
    loop = asyncio.get_running_loop()
    timed = [
        (pbx, pbx.sim)
        for pbx in pbxs
        if isinstance(pbx.sim, PSeriesSimulator) and calls_per_minute > 0
    ]
    for pbx, sim in timed:
        pbx.next_call = loop.time() + _pause(sim, calls_per_minute)
    while not stop.is_set():
        if not all(pbx.sim.running for pbx in pbxs):
            return False
        for pbx, sim in timed:
            if loop.time() >= pbx.next_call:
                pbx.next_call = loop.time() + _pause(sim, calls_per_minute)
                on_call(pbx, await asyncio.to_thread(sim.place_random_call))
        wait = min([0.5, *(pbx.next_call - loop.time() for pbx, _sim in timed)])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(wait, 0.001))
    return True


@app.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=int, default=8088, show_default=True, help="Port to listen on (0: any free)."
)
@click.option("--http", is_flag=True, default=False, help="Plain HTTP instead of HTTPS.")
@click.option(
    "--username", default="api", show_default=True, help="API username (S-Series, cloud)."
)
@click.option(
    "--password",
    envvar="CALLVAULT_SIM_PASSWORD",
    default=None,
    help="API password (S-Series, cloud; default: a random one for each PBX, printed at "
    "start). Env CALLVAULT_SIM_PASSWORD.",
)
@click.option(
    "--calls-per-minute",
    type=float,
    default=0.0,
    metavar="N",
    help="Place random calls in the background at this average rate, on each PBX "
    "(default 0: none).",
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
    f"(--kind p-series: {P_SERIES_SERIAL}). With --pbxs, the first PBX's: the number it "
    "ends in counts up from PBX to PBX.",
)
@click.option(
    "--legacy-tls",
    is_flag=True,
    default=False,
    help="Also accept TLS 1.0/1.1 (the PBX's 'Low' security level). S-Series and cloud only.",
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
    help="Run N independent PBXs (sim-1 ... sim-N), of one kind or each of its own (see "
    "--kind): each on its own port (--port, the next ones, or any free with --port 0), with "
    "its own serial (counting up from --serial), password or Client Secret, data directory "
    f"(DATA_DIR/sim-K), recordings, clock and faults. At most {MAX_FLEET}.",
)
@click.option(
    "--kind",
    default="s-series",
    show_default=True,
    metavar="KIND[,KIND...]",
    help="Which PBX to simulate: s-series, the S-Series API; cloud, the S-Series-based "
    "Yeastar Cloud PBX (its login also answers a refresh token, and a token ends 30 minutes "
    "after it was issued unless renewed); or p-series, the P-Series OpenAPI (tokens, "
    "recording/CDR lists, WebSocket events; --fault takes the P-Series fault names there). "
    "With --pbxs N, one kind for all of them, or a comma-separated list of N kinds, one per "
    "PBX in order: --pbxs 3 --kind s-series,cloud,p-series. In a fleet of both APIs each "
    "--fault goes to the PBXs whose kind knows it.",
)
@click.option(
    "--client-id",
    default="callvault",
    show_default=True,
    help="--kind p-series: the API application's Client ID (of every P-Series PBX).",
)
@click.option(
    "--client-secret",
    envvar="CALLVAULT_SIM_CLIENT_SECRET",
    default=None,
    help="--kind p-series: the Client Secret (default: a random one for each PBX, written "
    f"to DATA_DIR/{SECRET_FILE}, DATA_DIR/sim-K/{SECRET_FILE} with --pbxs). "
    "Env CALLVAULT_SIM_CLIENT_SECRET.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    help="Print the connection details as JSON (a list of them with --pbxs, each with its "
    "name and kind).",
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
    """Run a simulated Yeastar S-Series, Cloud or P-Series PBX (or a fleet of them, of one
    kind or mixed) until Ctrl-C: the API, recordings, events, faults."""
    kinds = _kinds(kind, pbxs)
    if initial_calls < 0:
        fail("--initial-calls must not be negative")
    if calls_per_minute < 0:
        fail("--calls-per-minute must not be negative")
    if legacy_tls and "p-series" in kinds:
        fail("--legacy-tls is for --kind s-series and cloud only: the P-Series simulator has none")
    faults, pseries_faults = _faults(list(fault), kinds)
    if pbxs > 1 and serial is not None and not serial[-1:].isdigit():
        fail("--serial must end in digits when --pbxs runs several (their serials count up)")
    if pbxs > 1 and port and port + pbxs - 1 > 65535:
        fail(f"--port {port} leaves no room for {pbxs} PBXs; choose a lower one or --port 0")
    # The temporary data directory is made here, not by the simulators, so that it is
    # removed on every way out: a failed set-up or start included, not only sim.stop().
    own_dir: Path | None = None
    if data_dir is None:
        prefix = "callvault-psim-" if set(kinds) == {"p-series"} else "callvault-sim-"
        try:
            own_dir = Path(tempfile.mkdtemp(prefix=prefix))
        except OSError as exc:
            fail(f"cannot create a temporary directory: {exc.strerror or exc}")
    try:
        root = own_dir or data_dir
        assert root is not None
        configs: list[SimulatorConfig | PSeriesConfig] = []
        for number, pbx_kind in enumerate(kinds):
            # In a fleet each has its own port, serial, directory, seed and fault counters.
            first = serial or (P_SERIES_SERIAL if pbx_kind == "p-series" else S_SERIES_SERIAL)
            where = root / fleet_name(number + 1) if pbxs > 1 else root
            pbx_port = port + number if port else 0
            pbx_seed = None if seed is None else seed + number
            if pbx_kind == "p-series":
                configs.append(
                    PSeriesConfig(
                        host=host,
                        port=pbx_port,
                        tls=not http,
                        client_id=client_id,
                        client_secret=client_secret,
                        serial=_count_up(first, number),
                        timezone=timezone,
                        data_dir=where,
                        seed=pbx_seed,
                        faults=dataclasses.replace(pseries_faults),
                        call_status_events=call_progress,
                    )
                )
            else:
                configs.append(
                    SimulatorConfig(
                        kind=pbx_kind,
                        host=host,
                        port=pbx_port,
                        tls=not http,
                        username=username,
                        password=password,
                        serial=_count_up(first, number),
                        timezone=timezone,
                        data_dir=where,
                        seed=pbx_seed,
                        faults=dataclasses.replace(faults),
                        legacy_tls=legacy_tls,
                        call_progress_reports=call_progress,
                    )
                )
        _run(
            configs,
            initial_calls=initial_calls,
            calls_per_minute=calls_per_minute,
            as_json=as_json,
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    print("simulator stopped", file=sys.stderr, flush=True)


def _kinds(given: str, pbxs: int) -> list[str]:
    """The kind of each of the `pbxs` PBXs: ``--kind`` names one for all, or lists one per
    PBX, comma-separated."""
    kinds = [item.strip().lower() for item in given.split(",")]
    for item in kinds:
        if item not in KINDS:
            fail(f"--kind: unknown kind {item!r}; known: {', '.join(KINDS)}")
    if len(kinds) == 1:
        return kinds * pbxs
    if len(kinds) != pbxs:
        fail(
            f"--kind lists {len(kinds)} kinds for {pbxs} PBX{'s' if pbxs > 1 else ''}: give "
            f"one kind for all, or one per PBX (--pbxs {len(kinds)})"
        )
    return kinds


def _count_up(serial: str, number: int) -> str:
    """`serial` with the number it ends in counted up by `number`, as wide as before:
    369351034049, 369351034050, ...; 3631A2124001, 3631A2124002, ..."""
    if number == 0:
        return serial
    head = serial.rstrip("0123456789")
    digits = serial[len(head) :]
    return head + str(int(digits) + number).zfill(len(digits))


def _faults(items: list[str], kinds: list[str]) -> tuple[Faults, PSeriesFaults]:
    """``--fault KEY[=VALUE]`` for the S-Series (and cloud) simulators and for the P-Series
    one. With PBXs of both APIs each goes to the kinds whose simulator knows its key (both
    know e.g. drop_rate); a key neither knows is refused."""
    s_series = any(kind != "p-series" for kind in kinds)
    p_series = "p-series" in kinds
    s_known = set(fault_names())
    p_known = {f.name for f in dataclasses.fields(PSeriesFaults)}
    s_items: list[str] = []
    p_items: list[str] = []
    for item in items:
        key = item.partition("=")[0].strip().replace("-", "_")
        # One API alone: its parser names what is wrong (and the keys it knows).
        to_s = s_series and (not p_series or key in s_known)
        to_p = p_series and (not s_series or key in p_known)
        if not (to_s or to_p):
            fail(f"unknown fault {key!r}; known: {', '.join(sorted(s_known | p_known))}")
        if to_s:
            s_items.append(item)
        if to_p:
            p_items.append(item)
    try:
        faults = parse_faults(s_items)
    except ValueError as exc:
        fail(str(exc))
    return faults, _pseries_faults(p_items)


def _pseries_faults(items: list[str]) -> PSeriesFaults:
    """``--fault KEY[=VALUE]`` for the P-Series simulator: KEY a PSeriesFaults field (dashes
    may stand for underscores); a bare KEY means 1 (counters), True (switches)."""
    faults = PSeriesFaults()
    kinds = {f.name: type(getattr(faults, f.name)) for f in dataclasses.fields(faults)}
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip().replace("-", "_")
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


def _introduce_pseries(sim: PSeriesSimulator, *, secret_file: Path | None, as_json: bool) -> None:
    """How to reach the P-Series simulator; never the secret itself, only where it is."""
    if as_json:
        _print(json.dumps(_pseries_details(sim, secret_file)))
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
    _print(f"Register it in an archive from another terminal ({_MASTER_KEY_HINT}):")
    _print(f"  {_register_command(_Pbx('sim-p', sim, secret_file))}")
    _print("Serving until Ctrl-C.")
