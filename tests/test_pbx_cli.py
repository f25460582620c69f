"""The `fetch` and `cdr` commands: what they print, their exit codes, their help screens,
their time options, and one line (never a traceback) for every expected failure.

Which path each test exercises: the commands run as subprocesses (or `fetch_recordings`
in-process) against the fake PBX over real HTTP (`serve_fake_pbx`) or the simulator over
real HTTPS (`sim`); no transport is injected, so every download goes through the socket
pump.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from callvault.cli._fetch import fetch_recordings
from callvault.pbx import PbxClient
from callvault.simulator import Simulator
from callvault.times import FORMATS
from support.pbx_fakes import PASSWORD, WAV, FakePbx, Sleeps, files_in, serve_fake_pbx
from support.pbx_sim import SIM_PASSWORD

# The fake PBX speaks plain HTTP, which the commands warn about.
HTTP_WARNING = (
    "callvault: warning: the PBX URL is plain http: the password hash, the token and every "
    "recording cross the network unencrypted; use https"
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`callvault ARGS` in a subprocess (its environment: ours, which the suite keeps free
    of CALLVAULT_* settings, plus `env`)."""
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_fetch(
    base: str, names: list[str], out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`callvault fetch` against the fake PBX at `base`, with its user and password."""
    args = ["fetch", "--pbx", base, "--username", "api", "--password-env", "PBX_SECRET"]
    return run_cli(*args, "--out", str(out), *extra, *names, env={"PBX_SECRET": PASSWORD})


def sim_env(sim: Simulator, **extra: str) -> dict[str, str]:
    return {
        "CALLVAULT_PBX": sim.url,
        "CALLVAULT_USERNAME": sim.username,
        "CALLVAULT_PASSWORD": SIM_PASSWORD,
        **extra,
    }


# ------------------------------------------------------------------ fetch


async def test_fetch_recordings_reports_each_failure_and_saves_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV, "c+1.wav": WAV})
    with serve_fake_pbx(pbx) as base:
        client = PbxClient(base, "api", PASSWORD, sleep=Sleeps())
        code = await fetch_recordings(
            client, ["a.wav", "missing.wav", "../b.wav", "c+1.wav"], tmp_path, show_progress=True
        )
    assert code == 1
    assert files_in(tmp_path) == ["a.wav", "c+1.wav"]
    err = capsys.readouterr().err.splitlines()
    assert "callvault: error: missing.wav: recording not found on the PBX, errno 20014" in err
    assert any(line.startswith("callvault: error: ../b.wav: ") for line in err)


async def test_fetch_stops_at_a_wrong_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, password_md5="0" * 32)
    with serve_fake_pbx(pbx) as base:
        client = PbxClient(base, "api", PASSWORD)
        code = await fetch_recordings(
            client, ["a.wav", "b.wav", "c.wav"], tmp_path, show_progress=False
        )
    assert code == 1
    assert pbx.count("login") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "callvault: error: login: wrong API username or password, errno 20003 "
        "(3 recording(s) not fetched)"
    ]


async def test_fetch_json_prints_one_object_per_saved_recording(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV, "c+1.wav": WAV})
    with serve_fake_pbx(pbx) as base:
        client = PbxClient(base, "api", PASSWORD, sleep=Sleeps())
        code = await fetch_recordings(
            client, ["a.wav", "missing.wav", "c+1.wav"], tmp_path, show_progress=False, as_json=True
        )
    assert code == 1
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["name"] for line in lines] == ["a.wav", "c+1.wav"]
    for line in lines:
        assert set(line) == {"name", "path", "size", "sha256", "seconds"}
        assert Path(line["path"]) == tmp_path / line["name"]
        assert Path(line["path"]).read_bytes() == WAV
        assert line["size"] == len(WAV)
        assert line["sha256"] == hashlib.sha256(WAV).hexdigest()
        assert isinstance(line["seconds"], float) and line["seconds"] > 0
    assert "missing.wav" in captured.err
    # Logged in before the first download, so no recording's seconds include the login.
    assert pbx.endpoints()[:2] == ["login", "recording/get_random"]
    assert pbx.count("login") == 1


async def test_fetch_retries_a_transient_login_failure_inside_the_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, login_503_next=1)
    with serve_fake_pbx(pbx) as base:
        client = PbxClient(base, "api", PASSWORD, sleep=Sleeps())
        code = await fetch_recordings(client, ["a.wav"], tmp_path, show_progress=False)
    assert code == 0
    assert (tmp_path / "a.wav").read_bytes() == WAV
    assert pbx.count("login") == 2
    assert capsys.readouterr().err == ""


def test_fetch_stops_at_a_refused_login_instead_of_logging_in_per_name(tmp_path: Path) -> None:
    pbx = FakePbx(login_errno="10004")
    with serve_fake_pbx(pbx) as base:
        done = run_fetch(base, ["a.wav", "b.wav", "c.wav"], tmp_path)
    assert done.returncode == 1
    assert pbx.count("login") == 1
    assert done.stderr.strip().splitlines() == [
        HTTP_WARNING,
        "callvault: error: login: a required parameter is blank, errno 10004 "
        "(3 recording(s) not fetched)",
    ]


def test_fetch_saves_a_recording_whose_header_names_it_in_utf_8(tmp_path: Path) -> None:
    name = "Müller-1001.wav"
    disposition = f'attachment; filename="{name}"'.encode()
    pbx = FakePbx(recordings={name: WAV}, download_headers=[(b"Content-Disposition", disposition)])
    with serve_fake_pbx(pbx) as base:
        done = run_fetch(base, [name], tmp_path)
    assert done.stderr.strip().splitlines() == [HTTP_WARNING]
    assert done.returncode == 0
    assert (tmp_path / name).read_bytes() == WAV


def test_sigterm_during_a_download_leaves_no_partial_file(tmp_path: Path) -> None:
    release = threading.Event()
    big = WAV + b"\x00" * 200_000
    pbx = FakePbx(recordings={"a.wav": big}, hold_download_body=release, hold_after_bytes=1000)
    out = tmp_path / "out"
    try:
        with serve_fake_pbx(pbx) as base:
            argv = [sys.executable, "-m", "callvault", "fetch", "--pbx", base]
            argv += ["--username", "api", "--password-env", "PBX_SECRET", "--out", str(out)]
            process = subprocess.Popen(
                [*argv, "a.wav"],
                env={**os.environ, "PBX_SECRET": PASSWORD},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                deadline = time.monotonic() + 30
                while not any(n.endswith(".part") for n in files_in(out)):
                    assert process.poll() is None, process.communicate()
                    assert time.monotonic() < deadline, "the download never started"
                    time.sleep(0.02)
                process.send_signal(signal.SIGTERM)
                _, stderr = process.communicate(timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                release.set()
    finally:
        release.set()
    assert process.returncode == 143
    assert stderr.strip().splitlines() == [
        HTTP_WARNING,
        "callvault: terminated; no partial file was kept",
    ]
    assert files_in(out) == []


def test_cli_fetch_end_to_end_with_pin(sim: Simulator, tmp_path: Path) -> None:
    ok = sim.place_call(callfrom="+4915112345678", callto="1000", type="Inbound")
    gone = sim.place_call(callfrom="1005")
    assert ok.recording and gone.recording and sim.cert_sha256
    sim.delete_recording(gone.recording)
    out = tmp_path / "out"
    env = {
        "CALLVAULT_PBX": sim.url,
        "CALLVAULT_USERNAME": sim.username,
        "MY_PBX_PASSWORD": SIM_PASSWORD,
    }
    args = ["fetch", "--password-env", "MY_PBX_PASSWORD", "--pin-sha256", sim.cert_sha256]
    result = run_cli(*args, "--out", str(out), ok.recording, gone.recording, env=env)
    assert result.returncode == 1
    assert (out / ok.recording).read_bytes() == sim.recording_path(ok.recording).read_bytes()
    assert sorted(os.listdir(out)) == [ok.recording]
    assert result.stderr.strip().splitlines() == [
        f"callvault: error: {gone.recording}: recording not found on the PBX, errno 20014"
    ]
    assert ok.recording in result.stdout
    assert SIM_PASSWORD not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr

    again = run_cli(*args, "--out", str(out), ok.recording, env=env)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    ("args", "env_extra", "expected"),
    [
        (["--pin-sha256", "00" * 32], {}, "does not match --pin-sha256"),
        ([], {}, "certificate not trusted"),
        (["--insecure"], {"CALLVAULT_PASSWORD": "wrong"}, "wrong API username or password"),
        (["--insecure"], {"CALLVAULT_PASSWORD": ""}, "the API password is not set"),
        (["--insecure", "--pbx", "https://127.0.0.1:1"], {}, "cannot reach the PBX"),
        (["--insecure", "--pbx", "127.0.0.1:8088"], {}, "has no scheme"),
        (["--insecure", "--api-version", "v9"], {}, "unknown API version 'v9'"),
        (["--insecure", "--pin-sha256", "ab" * 32], {}, "choose only one of"),
    ],
)
def test_cli_fetch_expected_failures_are_one_line(
    sim: Simulator, tmp_path: Path, args: list[str], env_extra: dict[str, str], expected: str
) -> None:
    call = sim.place_call()
    assert call.recording
    result = run_cli(
        "fetch", *args, "--out", str(tmp_path), call.recording, env=sim_env(sim, **env_extra)
    )
    assert result.returncode != 0
    lines = [
        line for line in result.stderr.splitlines() if not line.startswith("callvault: warning")
    ]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("callvault: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []
    assert sim.failed_login_count() <= 1


@pytest.mark.parametrize("command", ["fetch", "cdr"])
def test_http_to_the_pbx_tls_port_prints_one_line_with_the_https_url(
    sim: Simulator, tmp_path: Path, command: str
) -> None:
    url = sim.url.replace("https://", "http://")
    args = ["--out", str(tmp_path), "a.wav"] if command == "fetch" else ["--since", "2026-01-01"]
    result = run_cli(command, *args, env=sim_env(sim, CALLVAULT_PBX=url))
    assert result.returncode == 1
    hint = f"callvault: error: login: the PBX answered with TLS: use {sim.url}"
    assert result.stderr.strip().splitlines() == [HTTP_WARNING, hint]
    assert sim.request_log == []


def test_an_unreadable_ca_file_is_one_line(tmp_path: Path) -> None:
    # /proc/self/mem is a file that cannot be read from the start (EIO), even by root.
    done = run_fetch("https://127.0.0.1:9", ["a.wav"], tmp_path, "--ca-file", "/proc/self/mem")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "callvault: error: --ca-file /proc/self/mem: cannot read it (Input/output error)"
    ]


@pytest.mark.parametrize(
    "url", ["api:S3cret-pw@pbx.example:8088", "https://api:S3cret-pw@pbx.example:80x88"]
)
def test_a_password_typed_into_the_pbx_url_is_not_echoed(tmp_path: Path, url: str) -> None:
    done = run_fetch(url, ["a.wav"], tmp_path)
    assert done.returncode == 2
    assert "S3cret-pw" not in done.stderr + done.stdout
    assert "pbx.example" in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------- cdr


def test_cli_cdr_json_and_csv(sim: Simulator) -> None:
    call = sim.place_call(callfrom="+4915112345678", callto="1000", type="Inbound")
    assert sim.ca_file is not None
    day = call.timestart[:10]
    ca = ["--ca-file", str(sim.ca_file)]
    as_json = run_cli("cdr", *ca, "--since", day, "--until", day, "--json", env=sim_env(sim))
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert [(r["callid"], r["recording"]) for r in rows] == [(call.callid, call.recording)]
    as_csv = run_cli(
        "cdr", *ca, "--since", f"{day} 00:00:00", "--until", day, "--csv", env=sim_env(sim)
    )
    assert as_csv.returncode == 0, as_csv.stderr
    lines = as_csv.stdout.strip().splitlines()
    assert lines[0].startswith("callid,timestart,")
    assert call.recording is not None and call.recording in lines[1]
    table = run_cli("cdr", *ca, "--since", day, "--until", day, env=sim_env(sim))
    assert table.returncode == 0
    assert call.recording in table.stdout


def test_cdr_lists_calls_oldest_first(sim: Simulator) -> None:
    """The PBX's export lists calls as they ended; `cdr` prints them as they started."""
    short = sim.place_call(talk_seconds=5)
    long = sim.place_call(talk_seconds=900)  # ended after `short`, started long before it
    assert sim.ca_file is not None
    day = short.timestart[:10]
    listed = run_cli(
        "cdr", "--ca-file", str(sim.ca_file), "--since", day, "--until", day, "--json",
        env=sim_env(sim),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert [row["callid"] for row in json.loads(listed.stdout)] == [long.callid, short.callid]


def test_cdr_until_defaults_to_now(sim: Simulator) -> None:
    call = sim.place_call()
    assert sim.ca_file is not None
    since = call.timestart[:10]
    ca = ["--ca-file", str(sim.ca_file)]
    # Times are read, and "now" taken, in the PBX's time zone.
    done = run_cli(
        "cdr", *ca, "--since", since, "--timezone", sim.config.timezone, "--json", env=sim_env(sim)
    )
    assert done.returncode == 0, done.stderr
    assert [row["callid"] for row in json.loads(done.stdout)] == [call.callid]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--since", "2026-11-01", "--until", "2026-11-02", "--json", "--csv"],
            "choose one of --json and --csv",
        ),
        (
            ["--since", "yesterday", "--until", "2026-11-02"],
            f"--since: 'yesterday' is not a time: use {FORMATS}",
        ),
        (
            ["--since", "2026-11-01", "--until", "2026-11-02 25:00"],
            f"--until: '2026-11-02 25:00' is not a time: use {FORMATS}",
        ),
        (["--since", "2026-11-02", "--until", "2026-11-01"], "--until must be after --since"),
        (["--since", "2199-12-30"], "--since is in the future"),
    ],
)
def test_cdr_bad_options_exit_2(args: list[str], message: str) -> None:
    done = run_cli("cdr", "--pbx", "https://127.0.0.1:9", "--username", "api", *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"callvault: error: {message}"]


# ------------------------------------------------------------- help screens


def help_screen(command: str) -> str:
    done = run_cli(command, "--help", env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("command", ["fetch", "cdr"])
def test_help_at_80_columns_has_no_types_after_flags_and_no_early_line_breaks(
    command: str,
) -> None:
    screen = help_screen(command)
    assert "<bool>" not in screen
    assert "--help" in screen and "--json" in screen
    # The description, between the usage line and the first panel: every line is as
    # full as the width allows, i.e. the next line's first word would not have fitted.
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    end = next(i for i, line in enumerate(lines) if line in ("Arguments:", "Options:"))
    text = [line.strip() for line in lines[start:end]]
    # Click writes the description 2 columns in, within 80 - 2 columns: 76 for the text.
    for line, following in itertools.pairwise(text):
        if line and following:
            assert len(line) + 1 + len(following.split()[0]) > 80 - 2 - 2, (line, following)


def help_words(command: str) -> str:
    """The help screen's words in one line, without the panels' borders."""
    return " ".join(help_screen(command).replace("│", " ").split())


def test_fetch_help_documents_json_output() -> None:
    assert "name, path, size, sha256 and seconds" in help_words("fetch")


def test_cdr_help_says_until_defaults_to_now_and_words_the_formats_once() -> None:
    text = help_words("cdr")
    assert "Default: now." in text
    assert text.count(FORMATS) == 2  # --since and --until, in the same words
