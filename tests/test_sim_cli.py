"""`callvault simulate`: prints what a user needs, serves, stops cleanly; --fault parsing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from callvault.cli import _register, app
from callvault.simulator import Faults, apply_fault, parse_faults
from test_sim_helpers import md5


def _start(*args: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CALLVAULT_SIM_PASSWORD", None)
    return subprocess.Popen(
        [sys.executable, "-m", "callvault", "simulate", "--port", "0", "--seed", "5",
         "--data-dir", str(tmp_path / "pbx"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    return out, err


def test_simulate_prints_connection_details_and_serves(tmp_path: Path) -> None:
    process = _start("--password", "pw-123", "--initial-calls", "1", "--json", tmp_path=tmp_path)
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert info["url"].startswith("https://127.0.0.1:")
        assert info["password"] is None  # given by the user: not echoed
        assert len(info["cert_sha256"]) == 64
        [name] = info["recordings"]
        context = ssl.create_default_context(cafile=info["ca_file"])
        with httpx.Client(verify=context) as client:
            login = client.post(f"{info['url']}/api/v1.1.0/login",
                                json={"username": "api", "password": md5("pw-123"), "port": "0"})
            token = login.json()["token"]
            random = client.post(f"{info['url']}/api/v1.1.0/recording/get_random",
                                 params={"token": token}, json={"recording": name}).json()
            audio = client.get(f"{info['url']}/api/v1.1.0/recording/download",
                               params={"token": token, "recording": name,
                                       "random": random["random"]})
        assert audio.content[:4] == b"RIFF"
        assert audio.content == (tmp_path / "pbx" / "recordings" / name).read_bytes()
    finally:
        _out, err = _stop(process)
    assert "simulator stopped" in err


def test_simulate_banner_names_url_credentials_fingerprint_and_a_fetch_example(
        tmp_path: Path) -> None:
    process = _start("--initial-calls", "2", tmp_path=tmp_path)
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1] != "Serving until Ctrl-C.":
            line = process.stdout.readline()
            assert line, "the simulator ended early"
            lines.append(line.rstrip("\n"))
    finally:
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


def test_sigterm_also_stops_cleanly(tmp_path: Path) -> None:
    process = _start("--json", "--initial-calls", "0", "--http", tmp_path=tmp_path)
    assert process.stdout is not None
    info = json.loads(process.stdout.readline())
    assert info["url"].startswith("http://") and info["cert_sha256"] is None
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=20)
    assert process.returncode == 0 and "Traceback" not in err


def test_bad_fault_is_one_clear_line() -> None:
    _register()
    result = CliRunner().invoke(app, ["simulate", "--port", "0", "--fault", "explode"])
    assert result.exit_code == 1
    assert "unknown fault 'explode'" in result.output
    assert "Traceback" not in result.output


def test_busy_port_is_one_clear_line() -> None:
    _register()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["simulate", "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_fault_specs() -> None:
    faults = parse_faults(["drop-next-downloads", "slow_seconds=0.5", "drop_rate=0.25",
                           "invalidate_previous_tokens_on_login", "honour_range=false",
                           "error_5xx_next=3"])
    assert faults == Faults(drop_next_downloads=1, slow_seconds=0.5, drop_rate=0.25,
                            invalidate_previous_tokens_on_login=True, error_5xx_next=3)
    for bad, words in [("slow_seconds", "needs a value"), ("drop_rate=2", "between 0 and 1"),
                       ("error_5xx_next=x", "whole number"),
                       ("honour_range=maybe", "true or false"),
                       ("not_ready_seconds=-1", "must not be negative")]:
        with pytest.raises(ValueError, match=words):
            apply_fault(Faults(), bad)
