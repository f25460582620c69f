"""``callvault demo``: the whole product on one machine, in one command.

Starts a simulated PBX (HTTPS, self-signed certificate, calls every few seconds), runs the
archiver against it with the certificate pinned, serves the web app, creates an admin user
and prints its password once, and reports every recording as it is archived.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from pathlib import Path
from zoneinfo import ZoneInfo

import click

from callvault.cli._app import app
from callvault.cli._common import Terminated, command_name, fail, run_service

DEMO_USER = "admin"
WEB_HOST = "127.0.0.1"


def _port_taken_message(port: int, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += " (another program, or another callvault demo or serve, uses it)"
    return (
        f"cannot serve the web app on {WEB_HOST}:{port}: {reason}; "
        f"choose another port with --web-port PORT, or --web-port 0 for any free one"
    )


def _check_web_port(port: int) -> None:
    """Exit with one line if the web app's port cannot be had, before anything is started
    or written (the archiver binds it only after opening the index and the receiver)."""
    from callvault.serving import bind_socket

    if port == 0:
        return
    try:
        probe = bind_socket(WEB_HOST, port)
    except OSError as exc:
        fail(_port_taken_message(port, exc))
    probe.close()


@app.command("demo")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=Path("callvault-demo"),
    show_default=True,
    metavar="DIR",
    help="Where the demo keeps its archive and PBX data.",
)
@click.option(
    "--calls-per-minute",
    type=float,
    default=12.0,
    show_default=True,
    metavar="N",
    help="Simulated calls per minute.",
)
@click.option(
    "--web-port",
    type=int,
    default=8080,
    show_default=True,
    metavar="PORT",
    help="Port of the web app on 127.0.0.1 (0: any free).",
)
@click.option(
    "--duration",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="Stop after this many seconds (default 0: run until Ctrl-C).",
)
def demo(directory: Path, calls_per_minute: float, web_port: int, duration: float) -> None:
    """Run a simulated PBX, archive its recordings as calls end, and serve the web app."""
    from callvault.archive import Archived, Archiver, ArchiverConfig, StartError
    from callvault.index import users
    from callvault.pbx import TlsOptions
    from callvault.serving import ListenError
    from callvault.simulator import Simulator, SimulatorConfig
    from callvault.web import create_app

    if not 0 <= web_port < 65536:
        fail(f"--web-port {web_port}: use a port from 1 to 65535, or 0 for any free one", code=2)
    _check_web_port(web_port)
    directory = directory.resolve()
    archive = directory / "archive"
    try:
        archive.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {directory}: {exc.strerror}")

    simulator = Simulator(
        SimulatorConfig(
            port=0,
            data_dir=directory / "pbx",
            calls_per_minute=calls_per_minute,
            timezone="UTC",
        )
    )
    simulator.start()
    try:
        config = ArchiverConfig(
            pbx_url=simulator.url,
            username=simulator.username,
            password=simulator.password,
            archive=archive,
            tls=TlsOptions(pin_sha256=simulator.cert_sha256),
            events_host="127.0.0.1",
            events_port=0,
            timezone=ZoneInfo("UTC"),
            web_host=WEB_HOST,
            web_port=web_port,
        )

        def report(item: Archived) -> None:
            print(f"archived  {item.name}  {item.size:,} bytes  sha256 {item.sha256[:16]}…")

        try:
            archiver = Archiver(config, on_archived=report, web_app_factory=create_app)
            archiver.start()
        except ListenError as exc:
            # The port was free a moment ago (checked above), and was taken since.
            fail(f"{exc}; choose another port with --web-port PORT, or --web-port 0 for any")
        except StartError as exc:
            fail(str(exc))
        try:
            assert archiver.index is not None
            password = users.generate_password()
            if archiver.index.users.get(DEMO_USER) is None:
                archiver.index.users.add(DEMO_USER, "admin", password, "")
            else:
                archiver.index.users.set_password(DEMO_USER, password)
            serving_port = archiver.web_port

            def ready() -> None:
                _print_banner(archive, simulator.url, serving_port, password)
                for _ in range(3):
                    simulator.place_random_call(answered=True)

            with contextlib.suppress(Terminated):
                run_service(lambda stop: _until(stop, duration), ready=ready)
        finally:
            archiver.stop()
    finally:
        simulator.stop()
    print(f"\nStopped. The archive stays in {archive}; look at it with:")
    print(f"  {command_name()} list --archive {archive}")


def _print_banner(archive: Path, pbx_url: str, web_port: int | None, password: str) -> None:
    print("callvault demo: a simulated PBX, the archiver and the web app are running.")
    print(f"  simulated PBX   {pbx_url} (certificate pinned)")
    print(f"  archive         {archive}")
    print(f"  web app         http://127.0.0.1:{web_port}/")
    print(f"  log in as       {DEMO_USER} / {password}   (shown once; a new one every run)")
    command = command_name()
    print("Next, in another terminal:")
    print(f"  {command} list --archive {archive}")
    print(f"  {command} status --archive {archive}")
    print(f"  {command} verify --archive {archive}")
    print("Calls arrive every few seconds; each recording is reported as it is archived.")
    print("Press Ctrl-C to stop.\n", flush=True)


async def _until(stop: asyncio.Event, duration: float) -> None:
    """Until Ctrl-C or SIGTERM, or for `duration` seconds if it is above 0."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=duration if duration > 0 else None)
