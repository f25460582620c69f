"""`callvault simulate`: prints what a user needs, serves, stops cleanly; --fault parsing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from callvault.cli import _register, app
from callvault.simulator import Faults, apply_fault, parse_faults
from support.sim_helpers import Receiver, md5


def _start(*args: str, data_dir: Path | None, tmp: Path | None = None) -> subprocess.Popen[str]:
    """`callvault simulate` as a child; `tmp` becomes its TMPDIR (where a simulator without
    --data-dir makes its temporary directory)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CALLVAULT_SIM_PASSWORD", None)
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    where = ["--data-dir", str(data_dir)] if data_dir is not None else []
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "callvault",
            "simulate",
            "--port",
            "0",
            "--seed",
            "5",
            *where,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@contextmanager
def _simulate(
    *args: str, data_dir: Path | None, tmp: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """The child runs only inside the block: whatever fails in it (a read, a JSON line, a
    timeout), the child is killed and reaped on the way out."""
    process = _start(*args, data_dir=data_dir, tmp=tmp)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _stop(process: subprocess.Popen[str], signum: int = signal.SIGINT) -> tuple[str, str]:
    """Ask the child to stop as a user would; it must exit 0 without a traceback."""
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)  # a hang guard, not a speed requirement
    assert process.returncode == 0, err
    assert "Traceback" not in err
    return out, err


def test_simulate_prints_connection_details_and_serves(tmp_path: Path) -> None:
    with _simulate(
        "--password", "pw-123", "--initial-calls", "1", "--json", data_dir=tmp_path / "pbx"
    ) as process:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert info["url"].startswith("https://127.0.0.1:")
        assert info["password"] is None  # given by the user: not echoed
        assert len(info["cert_sha256"]) == 64
        [name] = info["recordings"]
        assert re.fullmatch(r"\d{14}-\d+\.\d+-\d+-\d+-(Internal|Inbound|Outbound)\.wav", name)
        context = ssl.create_default_context(cafile=info["ca_file"])
        with httpx.Client(verify=context) as client:
            login = client.post(
                f"{info['url']}/api/v1.1.0/login",
                json={"username": "api", "password": md5("pw-123"), "port": "0"},
            )
            token = login.json()["token"]
            random = client.post(
                f"{info['url']}/api/v1.1.0/recording/get_random",
                params={"token": token},
                json={"recording": name},
            ).json()
            audio = client.get(
                f"{info['url']}/api/v1.1.0/recording/download",
                params={"token": token, "recording": name, "random": random["random"]},
            )
        assert audio.content[:4] == b"RIFF"
        assert audio.content == (tmp_path / "pbx" / "recordings" / name).read_bytes()
        _out, err = _stop(process)
    assert "simulator stopped" in err


def test_simulate_banner_names_url_credentials_fingerprint_and_a_fetch_example(
    tmp_path: Path,
) -> None:
    with _simulate("--initial-calls", "2", data_dir=tmp_path / "pbx") as process:
        assert process.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1] != "Serving until Ctrl-C.":
            line = process.stdout.readline()
            assert line, "the simulator ended early"
            lines.append(line.rstrip("\n"))
        _stop(process)
    text = "\n".join(lines)
    cert = (tmp_path / "pbx" / "tls" / "pbx-cert.pem").read_bytes()
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.decode())).hexdigest()
    assert "URL          https://127.0.0.1:" in text
    assert "username     api" in text
    assert f"certificate  SHA-256 {fingerprint}" in text
    fetch = next(line for line in lines if "callvault fetch" in line)
    assert f"--pin-sha256 {fingerprint}" in fetch and "--password-env CALLVAULT_PASSWORD" in fetch
    password = next(line for line in lines if line.strip().startswith("password")).split()[-1]
    assert f"CALLVAULT_PASSWORD={password} " in fetch


def test_sigterm_also_stops_cleanly_and_removes_the_temporary_directory(tmp_path: Path) -> None:
    """Without --data-dir the simulator works in a callvault-sim-* directory of TMPDIR,
    there while it runs and gone once it stopped."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with _simulate("--json", "--initial-calls", "1", "--http", data_dir=None, tmp=tmp) as process:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert info["url"].startswith("http://") and info["cert_sha256"] is None
        [work_dir] = tmp.glob("callvault-sim-*")
        [name] = info["recordings"]
        assert (work_dir / "recordings" / name).is_file()
        _stop(process, signal.SIGTERM)
    assert list(tmp.iterdir()) == []


def test_bad_fault_is_one_clear_line() -> None:
    _register()
    result = CliRunner().invoke(app, ["simulate", "--port", "0", "--fault", "explode"])
    assert result.exit_code == 1
    assert "unknown fault 'explode'" in result.output
    assert "Traceback" not in result.output


def test_busy_port_is_one_clear_line_and_leaves_no_temporary_directory(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with _simulate("--port", str(port), data_dir=None, tmp=tmp) as process:
            out, err = process.communicate(timeout=60)  # a hang guard only
    assert process.returncode == 1, err
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"callvault: error: cannot listen on 127.0.0.1:{port}: "), err
    assert line.endswith("; choose another --port"), err
    assert list(tmp.iterdir()) == []


def test_name_faults_are_switched_on_from_the_command_line(tmp_path: Path) -> None:
    with _simulate(
        "--fault", "names_with_plus", "--initial-calls", "8", "--json", data_dir=tmp_path / "pbx"
    ) as process:
        assert process.stdout is not None
        names = json.loads(process.stdout.readline())["recordings"]
        _stop(process)
    assert len(names) == 8 and any("-+49151" in name for name in names), names


@pytest.mark.parametrize("switch", [None, "--no-call-progress"])
def test_simulate_sends_call_progress_reports_unless_told_not_to(
    tmp_path: Path, switch: str | None
) -> None:
    receiver = Receiver()
    args = ["--password", "pw-1", "--initial-calls", "0", "--calls-per-minute", "600", "--json"]
    try:
        with _simulate(*args, *([switch] if switch else []), data_dir=tmp_path / "pbx") as process:
            assert process.stdout is not None
            info = json.loads(process.stdout.readline())
            with httpx.Client(verify=ssl.create_default_context(cafile=info["ca_file"])) as client:
                body = {"username": "api", "password": md5("pw-1"), "port": receiver.port}
                login = client.post(f"{info['url']}/api/v1.1.0/login", json=body)
                assert login.json()["status"] == "Success"
            assert receiver.wait_for(12, timeout=30)
            _stop(process)
    finally:
        receiver.close()
    names = [r.json()["action"] for r in receiver.received]
    if switch is None:
        assert {"ALERT", "BYE", "ExtensionStatus", "NewCdr"} <= set(names), names
    else:
        assert set(names) == {"NewCdr"}, names


def test_help_says_names_are_digits_only_and_how_to_change_that() -> None:
    _register()
    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert "Recording names and numbers are digits only" in text
    for key in ("names_with_plus", "names_with_spaces", "names_non_ascii", "disposition_latin1"):
        assert key in text


def test_fault_specs() -> None:
    faults = parse_faults(
        [
            "drop-next-downloads",
            "slow_seconds=0.5",
            "drop_rate=0.25",
            "invalidate_previous_tokens_on_login",
            "honour_range=false",
            "error_5xx_next=3",
        ]
    )
    assert faults == Faults(
        drop_next_downloads=1,
        slow_seconds=0.5,
        drop_rate=0.25,
        invalidate_previous_tokens_on_login=True,
        error_5xx_next=3,
    )
    for bad, words in [
        ("slow_seconds", "needs a value"),
        ("drop_rate=2", "between 0 and 1"),
        ("error_5xx_next=x", "whole number"),
        ("honour_range=maybe", "true or false"),
        ("not_ready_seconds=-1", "must not be negative"),
    ]:
        with pytest.raises(ValueError, match=words):
            apply_fault(Faults(), bad)


def test_a_fleet_of_simulated_pbxs_each_with_its_own_port_serial_password_and_files(
    tmp_path: Path,
) -> None:
    with _simulate(
        "--pbxs", "3", "--initial-calls", "1", "--calls-per-minute", "600", "--json",
        data_dir=tmp_path / "fleet",
    ) as process:  # fmt: skip
        assert process.stdout is not None
        fleet = json.loads(process.stdout.readline())
        assert [pbx["name"] for pbx in fleet] == ["sim-1", "sim-2", "sim-3"]
        assert len({pbx["url"] for pbx in fleet}) == 3
        assert [pbx["serial"] for pbx in fleet] == ["369351034049", "369351034050", "369351034051"]
        assert len({pbx["password"] for pbx in fleet}) == 3
        assert len({pbx["cert_sha256"] for pbx in fleet}) == 3
        for pbx in fleet:
            context = ssl.create_default_context(cafile=pbx["ca_file"])
            with httpx.Client(verify=context) as client:
                wrong = client.post(  # another PBX's password is wrong here
                    f"{pbx['url']}/api/v1.1.0/login",
                    json={"username": "api", "password": md5(fleet[0]["password"]), "port": "0"},
                ).json()
                assert (wrong["status"] == "Success") == (pbx is fleet[0])
            [name] = pbx["recordings"]
            assert (tmp_path / "fleet" / pbx["name"] / "recordings" / name).is_file()
        # Calls placed in the background are announced with their PBX.
        line = json.loads(process.stdout.readline())
        assert line["pbx"] in {"sim-1", "sim-2", "sim-3"} and line["call"]
        _out, err = _stop(process, signal.SIGTERM)
    assert err.count("simulator stopped") == 1


def test_a_fleet_whose_ports_would_run_out_is_one_clear_line() -> None:
    runner = CliRunner()
    _register()
    result = runner.invoke(app, ["simulate", "--pbxs", "3", "--port", "65534"])
    assert result.exit_code == 1
    assert "--port 65534 leaves no room for 3 PBXs" in result.output
