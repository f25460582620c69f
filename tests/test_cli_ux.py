"""What a new user meets first: `callvault demo` and `callvault web` with their port taken,
and `callvault list` showing times in the PBX's zone that `serve` saved. Real processes,
real sockets on 127.0.0.1, the real simulator and SQLite."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from callvault.archive import Archiver
from callvault.cli import _register, app
from callvault.index import SettingKey, open_index
from callvault.simulator import Simulator, SimulatorConfig
from support.archive import archiver_config, wait_until

_register()
SECOND = timedelta(seconds=1)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another program listens on for the whole test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _callvault(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
    )


def _without_the_venv_on_path() -> dict[str, str]:
    """The environment of a fresh shell: the virtual environment is not activated."""
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != venv_bin
    )
    return {**os.environ, "PATH": path}


# -- demo -------------------------------------------------------------------------------


def test_demo_archives_recordings_and_says_so(tmp_path: Path) -> None:
    # The README's first command: a simulated PBX, the archiver and the web app, for real.
    demo_dir = tmp_path / "callvault-demo"
    fresh_shell = _without_the_venv_on_path()
    result = _callvault(
        "demo", "--dir", str(demo_dir), "--web-port", "0", "--duration", "10",
        "--calls-per-minute", "60", cwd=tmp_path, env=fresh_shell,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    reported = [line.split()[1] for line in lines if line.startswith("archived")]
    assert reported, result.stdout
    assert "log in as       admin / " in result.stdout
    listed = _callvault("list", "--json", "--archive", str(demo_dir / "archive"), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    archived = {o["name"]: o for o in items if o["state"] == "archived"}
    assert set(reported) <= set(archived)
    for name in reported:
        data = (demo_dir / "archive" / archived[name]["storage_key"]).read_bytes()
        assert data[:4] == b"RIFF" and hashlib.sha256(data).hexdigest() == archived[name]["sha256"]
    # What it says to run next works as printed in a fresh shell, where the virtual
    # environment is not activated (callvault not on the PATH): it names the full path.
    [suggested] = [
        line.strip()
        for line in lines
        if line.strip().endswith("list --archive " + str(demo_dir / "archive"))
    ][:1]
    argv = shlex.split(suggested)
    assert argv[0] == str(Path(sys.executable).parent / "callvault")
    again = subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        env=fresh_shell,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "archived" in again.stdout


def test_demo_with_its_web_port_taken_is_one_line_and_starts_nothing(
    tmp_path: Path, taken_port: int
) -> None:
    demo_dir = tmp_path / "callvault-demo"
    result = _callvault(
        "demo", "--dir", str(demo_dir), "--web-port", str(taken_port), "--duration", "30",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"callvault: error: cannot serve the web app on 127.0.0.1:{taken_port}: Address "
        "already in use (another program, or another callvault demo or serve, uses it); "
        "choose another port with --web-port PORT, or --web-port 0 for any free one"
    ]
    assert result.stdout == ""  # no banner, no admin password for a demo that is not there
    # Nothing was started or written: no PBX data, no half-made archive or index.
    assert not demo_dir.exists()


def test_demo_port_taken_after_the_check_still_ends_in_one_error_line(
    tmp_path: Path, taken_port: int
) -> None:
    """The port is free when checked and taken when the archiver binds it (as if another
    program took it in between): the demo stops what it started and says so."""
    demo_dir = tmp_path / "callvault-demo"
    script = (
        "import sys\n"
        "from callvault.cli import _demo, main\n"
        "_demo._check_web_port = lambda port: None\n"
        "sys.argv[0] = 'callvault'\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "demo", "--dir", str(demo_dir),
         "--web-port", str(taken_port), "--duration", "30"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("callvault: ")]
    assert errors == [
        f"callvault: error: cannot listen for the web app on 127.0.0.1:{taken_port}: Address "
        "already in use (is another callvault serve running?); choose another port with "
        "--web-port PORT, or --web-port 0 for any"
    ]
    assert "log in as" not in result.stdout
    # The index it opened is whole: `list` reads it (nothing archived).
    listed = _callvault("list", "--json", "--archive", str(demo_dir / "archive"), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["items"] == []


# -- web --------------------------------------------------------------------------------


def _empty_archive(root: Path) -> Path:
    root.mkdir()
    open_index(f"sqlite:///{root / 'callvault.db'}").close()
    return root


def test_web_with_its_port_taken_never_claims_to_serve(tmp_path: Path, taken_port: int) -> None:
    archive = _empty_archive(tmp_path / "archive")
    result = _callvault(
        "web", "--archive", str(archive), "--listen", f"127.0.0.1:{taken_port}", cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "serving" not in result.stdout
    assert result.stderr.splitlines() == [
        f"callvault: error: cannot listen for the web app on 127.0.0.1:{taken_port}: Address "
        "already in use (another program uses it: choose another with --listen HOST:PORT)"
    ]


def test_web_serves_on_its_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    archive = _empty_archive(tmp_path / "archive")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "callvault", "web", "--archive", str(archive),
         "--listen", f"127.0.0.1:{port}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline(), process.stdout.readline()]
        assert lines[1].startswith(f"callvault web: serving http://127.0.0.1:{port}/"), lines
        # Said once bound: the server answers (the login page), no retry needed.
        page = httpx.get(f"http://127.0.0.1:{port}/login", timeout=30)
        assert page.status_code == 200 and "<form" in page.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


# -- list in the PBX's zone -------------------------------------------------------------


def test_list_shows_calls_in_the_zone_serve_saved_not_the_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "archive"
    with Simulator(SimulatorConfig(timezone="Europe/Berlin", event_retry_interval=0.2)) as sim:
        config = archiver_config(sim, archive, reconcile_at_start=False)
        with Archiver(config) as archiver:
            cdr = sim.place_call(callfrom="1001", callto="1003", talk_seconds=2)
            live = archiver.index
            assert live is not None
            assert wait_until(
                lambda: live.recordings.counts_by_state()["archived"] == 1, timeout=60
            )
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        assert index.settings.get(SettingKey.PBX_TIMEZONE) == "Europe/Berlin"
    # The host (and this process) say Tokyo, 7 or 8 hours ahead of Berlin.
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    runner = CliRunner()
    result = runner.invoke(app, ["list", "--archive", str(archive)])
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.startswith("START (Europe/Berlin)")
    assert row.split()[:5] == [*cdr.timestart.split(), "archived", "1001", "1003"]
    found = json.loads(runner.invoke(app, ["list", "--json", "--archive", str(archive)]).stdout)
    assert found["items"][0]["timestart_local"] == cdr.timestart
    # --since and --until read the same zone: the second of the call, in Berlin, finds it.
    start = datetime.fromisoformat(cdr.timestart)
    window = [
        "--since",
        f"{start:%Y-%m-%d %H:%M:%S}",
        "--until",
        f"{start + SECOND:%Y-%m-%d %H:%M:%S}",
    ]
    found = json.loads(
        runner.invoke(app, ["list", "--json", "--archive", str(archive), *window]).stdout
    )
    assert [o["name"] for o in found["items"]] == [cdr.recording]
    # A zone given on purpose wins over the saved one.
    tokyo = runner.invoke(app, ["list", "--archive", str(archive), "--timezone", "Asia/Tokyo"])
    assert tokyo.stdout.splitlines()[0].startswith("START (Asia/Tokyo)")
    status = runner.invoke(app, ["status", "--archive", str(archive)])
    assert "PBX time zone: Europe/Berlin" in status.stdout


def test_backfill_saves_the_pbx_zone_it_read_the_cdr_in(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    with Simulator(SimulatorConfig(timezone="Europe/Berlin")) as sim:
        env = {
            "CALLVAULT_PASSWORD": sim.password,
            "CALLVAULT_PBX": sim.url,
            "CALLVAULT_USERNAME": sim.username,
            "CALLVAULT_PIN_SHA256": sim.cert_sha256 or "",
            "CALLVAULT_ARCHIVE": str(archive),
        }
        result = CliRunner().invoke(
            app,
            ["backfill", "--since", "2024-05-01", "--until", "2024-05-02", "--queue-only",
             "--timezone", "Europe/Berlin"],
            env=env,
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        assert index.settings.get(SettingKey.PBX_TIMEZONE) == "Europe/Berlin"


def test_version() -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [str(Path(sys.executable).with_name("callvault")), "--version"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, f"callvault {version('callvault')}\n")


def test_a_service_keeps_what_it_started_with_out_of_the_collectors_passes() -> None:
    # A full collection walked the whole application every few searches (bench/search.py:
    # p95 94 ms against 64); `run_service` freezes what exists when the service starts.
    import gc

    from callvault.cli._common import run_service

    made_before: list[object] = [[]]  # a list is always tracked (an empty dict is not)

    def collected(thing: object) -> bool:
        return any(tracked is thing for tracked in gc.get_objects())

    assert collected(made_before)
    seen: list[bool] = []

    async def service(stop: object) -> int:
        seen.append(collected(made_before))
        return 7

    assert run_service(service) == 7
    assert seen == [False]
    gc.unfreeze()  # as the autouse fixture does after every test
    assert collected(made_before)
