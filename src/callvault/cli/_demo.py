"""``callvault demo``: the whole product on one machine, in one command.

Starts a simulated PBX (HTTPS, self-signed certificate, calls every few seconds), runs the
archiver against it with the certificate pinned, serves the web app, creates an admin user
and prints its password once, and reports every recording as it is archived. With
``--pbxs N``, N simulated PBXs (``sim-1`` ...), registered in the archive's registry of
PBXs with their passwords sealed under a master key the demo keeps in its directory, all
archived by the one archiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
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
@click.option(
    "--pbxs",
    type=click.IntRange(1, 20),
    default=1,
    show_default=True,
    metavar="N",
    help="Simulated PBXs (sim-1 ... sim-N), all archived by the one archiver.",
)
def demo(
    directory: Path, calls_per_minute: float, web_port: int, duration: float, pbxs: int
) -> None:
    """Run a simulated PBX (or several), archive its recordings as calls end, and serve the
    web app."""
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
        directory.mkdir(parents=True, exist_ok=True)
        archive.mkdir(mode=0o700, exist_ok=True)  # its owner's alone, as serve makes one
    except OSError as exc:
        fail(f"cannot create {directory}: {exc.strerror}")

    simulators = [
        Simulator(
            SimulatorConfig(
                port=0,
                data_dir=directory / ("pbx" if pbxs == 1 else f"pbx-sim-{n + 1}"),
                calls_per_minute=calls_per_minute / pbxs,
                timezone="UTC",
                serial=str(369351034049 + n),
            )
        )
        for n in range(pbxs)
    ]
    simulator = simulators[0]
    for sim in simulators:
        sim.start()
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
        if pbxs > 1:
            config = _fleet_config(config, simulators, directory)

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
                urls = ", ".join(sim.url for sim in simulators)
                _print_banner(
                    archive, urls, serving_port, password, pbxs=pbxs, key=directory / "master.key"
                )
                for sim in simulators:
                    for _ in range(3 if pbxs == 1 else 1):
                        sim.place_random_call(answered=True)

            with contextlib.suppress(Terminated):
                run_service(lambda stop: _until(stop, duration), ready=ready)
        finally:
            archiver.stop()
    finally:
        for sim in simulators:
            sim.stop()
    print(f"\nStopped. The archive stays in {archive}; look at it with:")
    print(f"  {command_name()} list --archive {archive}")


def _fleet_config(config: Any, simulators: list[Any], directory: Path) -> Any:
    """The archiver's config for several simulated PBXs: each registered as sim-N (its
    address and password brought up to date: they are new on every run), under a master
    key the demo keeps in its directory."""
    from dataclasses import replace

    from callvault.archive import PbxTarget
    from callvault.index import open_index
    from callvault.index.pbxs import PbxConfig
    from callvault.keys import create_key_file, read_key_file
    from callvault.ops import add_pbx, edit_pbx
    from callvault.pbx import TlsOptions

    key = directory / "master.key"
    if not key.exists():
        create_key_file(key)
    keyring = read_key_file(key)
    targets = []
    with open_index(config.resolved_db_url()) as index:
        for number, sim in enumerate(simulators, 1):
            name = f"sim-{number}"
            settings = PbxConfig(
                url=sim.url, username=sim.username, pin_sha256=sim.cert_sha256, timezone="UTC"
            )
            now = datetime.now(UTC)
            if index.pbxs.get(name) is None:
                add_pbx(
                    index, keyring, name, settings, sim.password,
                    actor="demo", remote_addr="local", now=now,
                )  # fmt: skip
            else:
                changes = {"url": sim.url, "pin_sha256": sim.cert_sha256}
                edit_pbx(
                    index, name, changes, password=sim.password, keyring=keyring,
                    actor="demo", remote_addr="local", now=now,
                )  # fmt: skip
            targets.append(
                PbxTarget(
                    pbx_url=sim.url,
                    username=sim.username,
                    password=sim.password,
                    registry_name=name,
                    tls=TlsOptions(pin_sha256=sim.cert_sha256),
                    timezone=ZoneInfo("UTC"),
                )
            )
    first = targets[0]
    return replace(config, registry_name=first.registry_name, more_pbxs=tuple(targets[1:]))


def _print_banner(
    archive: Path,
    pbx_url: str,
    web_port: int | None,
    password: str,
    *,
    pbxs: int = 1,
    key: Path | None = None,
) -> None:
    if pbxs == 1:
        print("callvault demo: a simulated PBX, the archiver and the web app are running.")
        print(f"  simulated PBX   {pbx_url} (certificate pinned)")
    else:
        print(f"callvault demo: {pbxs} simulated PBXs, the archiver and the web app are running.")
        print(f"  simulated PBXs  sim-1 ... sim-{pbxs}: {pbx_url} (certificates pinned)")
    print(f"  archive         {archive}")
    if pbxs > 1 and key is not None:
        print(f"  master key      {key} (seals the PBXs' passwords in the registry)")
    print(f"  web app         http://127.0.0.1:{web_port}/")
    print(f"  log in as       {DEMO_USER} / {password}   (shown once; a new one every run)")
    command = command_name()
    print("Next, in another terminal:")
    print(f"  {command} list --archive {archive}")
    print(f"  {command} status --archive {archive}")
    print(f"  {command} verify --archive {archive}")
    if pbxs > 1 and key is not None:
        print(f"  {command} pbx test sim-1 --archive {archive} --master-key-file {key}")
    print("Calls arrive every few seconds; each recording is reported as it is archived.")
    print("Press Ctrl-C to stop.\n", flush=True)


async def _until(stop: asyncio.Event, duration: float) -> None:
    """Until Ctrl-C or SIGTERM, or for `duration` seconds if it is above 0."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=duration if duration > 0 else None)
