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
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from callvault.cli import _register, app
from callvault.cli._simulate import _faults
from callvault.simulator import Faults, PSeriesFaults, apply_fault, parse_faults
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
        assert [pbx["kind"] for pbx in fleet] == ["s-series"] * 3
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


OPENAPI = "/openapi/v1.0"


def _client(pbx: dict[str, Any]) -> httpx.Client:
    """An HTTPS client for one PBX of the printed details, trusting its certificate (and
    with the User-Agent the P-Series API requires)."""
    context = ssl.create_default_context(cafile=pbx["ca_file"])
    return httpx.Client(base_url=pbx["url"], verify=context, headers={"User-Agent": "OpenAPI"})


def _get_token(pbx: dict[str, Any], secret: str) -> Any:
    with _client(pbx) as client:
        body = {"username": pbx["client_id"], "password": secret}
        return client.post(f"{OPENAPI}/get_token", json=body).json()


def _secret(pbx: dict[str, Any]) -> str:
    """The generated Client Secret, from the file the details name (mode 0600)."""
    secret_file = Path(pbx["client_secret_file"])
    assert secret_file.stat().st_mode & 0o777 == 0o600
    return secret_file.read_text().strip()


def test_a_p_series_fleet_each_with_its_own_port_serial_secret_and_calls(tmp_path: Path) -> None:
    args = ["--kind", "p-series", "--pbxs", "2", "--initial-calls", "1", "--json"]
    with _simulate(*args, "--calls-per-minute", "600", data_dir=tmp_path / "fleet") as process:
        assert process.stdout is not None
        fleet = json.loads(process.stdout.readline())
        assert [pbx["name"] for pbx in fleet] == ["sim-1", "sim-2"]
        assert [pbx["kind"] for pbx in fleet] == ["p-series", "p-series"]
        assert [pbx["serial"] for pbx in fleet] == ["3631A2124001", "3631A2124002"]
        assert all(pbx["url"].startswith("https://127.0.0.1:") for pbx in fleet)
        assert len({pbx["url"] for pbx in fleet}) == 2
        assert len({pbx["cert_sha256"] for pbx in fleet}) == 2
        assert [pbx["client_secret_file"] for pbx in fleet] == [
            str(tmp_path / "fleet" / name / "client-secret") for name in ("sim-1", "sim-2")
        ]
        secrets = [_secret(pbx) for pbx in fleet]
        assert len(set(secrets)) == 2
        for pbx, own, other in zip(fleet, secrets, reversed(secrets), strict=True):
            assert _get_token(pbx, own)["errcode"] == 0
            assert _get_token(pbx, other)["errcode"] != 0  # another PBX's secret is wrong here
            assert len(pbx["recordings"]) == 1
        # Calls placed in the background (the CLI's timer: the P-Series simulator has none)
        # are announced with their PBX, and that PBX then lists their recordings.
        announced: dict[str, str] = {}
        while len(announced) < 2:
            line = json.loads(process.stdout.readline())
            assert line["pbx"] in {"sim-1", "sim-2"} and line["call"]
            if line["recording"] is not None:
                announced.setdefault(line["pbx"], line["recording"])
        for pbx, secret in zip(fleet, secrets, strict=True):
            with _client(pbx) as client:
                token = client.post(
                    f"{OPENAPI}/get_token", json={"username": "callvault", "password": secret}
                ).json()["access_token"]
                listed = client.get(
                    f"{OPENAPI}/recording/list",
                    params={"access_token": token, "page_size": 10000},
                ).json()
            assert listed["errcode"] == 0
            assert announced[pbx["name"]] in {row["file"] for row in listed["data"]}
        out, err = _stop(process)
    assert not any(secret in out + err for secret in secrets)
    assert err.count("simulator stopped") == 1


def test_a_mixed_fleet_runs_each_pbx_as_its_kind(tmp_path: Path) -> None:
    with _simulate(
        "--pbxs", "3", "--kind", "s-series,cloud,p-series", "--password", "pw-1",
        "--initial-calls", "1", "--json", data_dir=tmp_path / "fleet",
    ) as process:  # fmt: skip
        assert process.stdout is not None
        fleet = json.loads(process.stdout.readline())
        assert [(pbx["name"], pbx["kind"]) for pbx in fleet] == [
            ("sim-1", "s-series"),
            ("sim-2", "cloud"),
            ("sim-3", "p-series"),
        ]
        assert [pbx["serial"] for pbx in fleet] == ["369351034049", "369351034050", "3631A2124003"]
        assert all(len(pbx["recordings"]) == 1 for pbx in fleet)
        s_series, cloud, p_series = fleet
        login = {"username": "api", "password": md5("pw-1"), "port": "0"}
        for pbx in (s_series, cloud):
            with _client(pbx) as client:
                answer = client.post("/api/v1.1.0/login", json=login).json()
                assert answer["status"] == "Success"
                assert ("refreshtoken" in answer) == (pbx is cloud)  # the Cloud PBX's own
                assert client.post(f"{OPENAPI}/get_token", json={}).status_code == 404
        assert _get_token(p_series, _secret(p_series))["errcode"] == 0
        with _client(p_series) as client:
            assert client.post("/api/v1.1.0/login", json=login).status_code == 404
        _out, err = _stop(process)
    assert err.count("simulator stopped") == 1


def test_a_mixed_fleet_table_names_each_kind_and_how_to_register_it(tmp_path: Path) -> None:
    with _simulate(
        "--pbxs", "2", "--kind", "cloud,p-series", "--initial-calls", "0",
        data_dir=tmp_path / "fleet",
    ) as process:  # fmt: skip
        assert process.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1] != "Serving until Ctrl-C.":
            line = process.stdout.readline()
            assert line, "the simulator ended early"
            lines.append(line.rstrip("\n"))
        out, _err = _stop(process)
    assert lines[0] == "callvault simulator: 2 Yeastar PBXs (1 cloud, 1 p-series)"
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("  sim-")}
    assert rows["sim-1"][1] == "cloud" and rows["sim-1"][3] == "369351034049"
    assert rows["sim-2"][1] == "p-series" and rows["sim-2"][3] == "3631A2124002"
    secret_file = tmp_path / "fleet" / "sim-2" / "client-secret"
    cloud = next(line for line in lines if "pbx add sim-1 " in line)
    assert f"--url {rows['sim-1'][2]} --kind cloud --username api" in cloud
    pseries = next(line for line in lines if "pbx add sim-2 " in line)
    assert pseries.strip().startswith(f'PBX_SECRET="$(cat {secret_file})" ')
    assert f"--url {rows['sim-2'][2]} --kind p-series --client-id callvault" in pseries
    assert secret_file.read_text().strip() not in out
    # pbx add needs the archive's master key: the table says how to make one first.
    assert any("callvault keys create --file KEY" in line for line in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pbxs", "3", "--kind", "s-series,p-series"], "--kind lists 2 kinds for 3 PBXs"),
        (["--kind", "s-series,cloud"], "--kind lists 2 kinds for 1 PBX: "),
        (["--pbxs", "2", "--kind", "s-series,fax"], "--kind: unknown kind 'fax'"),
        (["--kind", "p-series", "--legacy-tls"], "--legacy-tls is for --kind s-series and"),
        (["--pbxs", "2", "--kind", "p-series", "--serial", "A1B"], "--serial must end in digits"),
        (["--kind", "p-series", "--calls-per-minute", "-1"], "--calls-per-minute must not be"),
        (["--pbxs", "2", "--kind", "cloud,p-series", "--fault", "boom"], "unknown fault 'boom'"),
        (["--kind", "p-series", "--fault", "boom"], "unknown P-Series fault 'boom'"),
        (["--pbxs", "2", "--kind", "p-series", "--port", "65535"], "leaves no room for 2 PBXs"),
    ],
)
def test_bad_kind_and_fleet_input_is_one_clear_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    _register()
    result = CliRunner().invoke(
        app, ["simulate", "--port", "0", "--data-dir", str(tmp_path / "pbx"), *args]
    )
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("callvault: error: ") and message in line, line
    assert not (tmp_path / "pbx").exists()  # refused before anything was set up


def test_a_fault_of_a_mixed_fleet_goes_to_the_kinds_that_know_it() -> None:
    items = ["drop_rate=0.5", "ws-drop-next=2", "yswav_names"]
    faults, pseries_faults = _faults(items, ["s-series", "p-series"])
    assert faults == Faults(drop_rate=0.5, yswav_names=True)
    assert pseries_faults == PSeriesFaults(drop_rate=0.5, ws_drop_next=2)
