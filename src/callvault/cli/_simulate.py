"""`callvault simulate`: run the PBX simulator until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import click

from callvault.cli._app import app
from callvault.cli._common import Terminated, command_name, fail, run_service
from callvault.pbx import CallDetail
from callvault.simulator import Simulator, SimulatorConfig, fault_names, parse_faults


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
    config: SimulatorConfig, *, password_given: bool, initial_calls: int, as_json: bool
) -> None:
    """Set up and start the simulator, print its details, serve until SIGINT/SIGTERM."""
    try:
        sim = Simulator(config)
    except Exception as exc:  # bad time zone, unwritable data directory
        fail(f"cannot set up the simulator: {exc}")
    try:
        try:
            sim.start()
        except OSError as exc:
            fail(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}; "
                "choose another --port"
            )
        except RuntimeError as exc:
            fail(str(exc))
        for _ in range(initial_calls):
            sim.place_random_call(answered=True)

        def announce(cdr: CallDetail) -> None:
            if as_json:
                _print(json.dumps({"call": cdr.callid, "recording": cdr.recording}))
            else:
                _print(_describe_call(cdr))

        def ready() -> None:
            _introduce(sim, password_given=password_given, as_json=as_json)
            sim.add_call_listener(announce)

        # SIGTERM and Ctrl-C both stop it (handled explicitly: a shell may start background
        # jobs with SIGINT ignored).
        if not run_service(lambda stop: _watch(sim, stop), ready=ready):
            fail("the simulator stopped unexpectedly")
    except Terminated:
        pass
    finally:
        sim.stop()


def _introduce(sim: Simulator, *, password_given: bool, as_json: bool) -> None:
    """What the simulator is and how to reach it, and the calls placed so far."""
    if not as_json:
        _banner(sim, password_given=password_given)
        for cdr in sim.state.cdrs():
            _print(_describe_call(cdr))
        return
    _print(
        json.dumps(
            {
                "url": sim.url,
                "username": sim.username,
                "password": None if password_given else sim.password,
                "cert_sha256": sim.cert_sha256,
                "ca_file": str(sim.ca_file) if sim.ca_file else None,
                "recordings": sim.recording_names(),
                "serial": sim.serial,
            }
        )
    )


async def _watch(sim: Simulator, stop: asyncio.Event) -> bool:
    """Until `stop` is set (True), or the simulator stops by itself (False)."""
    while not stop.is_set():
        if not sim.running:
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
    "--serial", default="369351034049", show_default=True, help="The PBX serial number (sn)."
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
    "--json", "as_json", is_flag=True, default=False, help="Print the connection details as JSON."
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
    serial: str,
    legacy_tls: bool,
    call_progress: bool,
    as_json: bool,
) -> None:
    """Run a simulated Yeastar S-Series PBX until Ctrl-C: the API, recordings, events, faults."""
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
    try:
        config = SimulatorConfig(
            host=host,
            port=port,
            tls=not http,
            username=username,
            password=password,
            serial=serial,
            timezone=timezone,
            data_dir=own_dir or data_dir,
            calls_per_minute=max(calls_per_minute, 0.0),
            seed=seed,
            faults=faults,
            legacy_tls=legacy_tls,
            call_progress_reports=call_progress,
        )
        _run(
            config,
            password_given=password is not None,
            initial_calls=initial_calls,
            as_json=as_json,
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    print("simulator stopped", file=sys.stderr, flush=True)
