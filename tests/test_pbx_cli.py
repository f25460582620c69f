"""The fetch/cdr command helpers in-process: time ranges, day windows, fetch results."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from callvault.cli._fetch import day_windows, fetch_recordings, parse_time
from callvault.pbx import PbxClient
from support.pbx_fakes import PASSWORD, WAV, FakePbx, Sleeps


def test_parse_time() -> None:
    assert parse_time("2024-03-01", end_of_day=False) == datetime(2024, 3, 1)
    assert parse_time("2024-03-01", end_of_day=True) == datetime(2024, 3, 1, 23, 59, 59)
    assert parse_time("2024-03-01 10:20:30", end_of_day=True) == datetime(2024, 3, 1, 10, 20, 30)
    assert parse_time("2024-03-01T10:20", end_of_day=False) == datetime(2024, 3, 1, 10, 20)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_time("yesterday", end_of_day=False)


def test_day_windows_cover_the_range_without_gaps_or_overlap() -> None:
    since, until = datetime(2024, 3, 1, 12), datetime(2024, 3, 4, 6, 30)
    windows = list(day_windows(since, until))
    assert windows[0][0] == since and windows[-1][1] == until
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert (start - end).total_seconds() == 1
    assert all((end - start).total_seconds() < 86400 for start, end in windows)
    assert len(windows) == 3
    assert list(day_windows(since, since)) == [(since, since)]


async def test_fetch_recordings_reports_each_failure_and_saves_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV, "c+1.wav": WAV})
    client = PbxClient(
        "https://127.0.0.1:8088",
        "api",
        PASSWORD,
        transport=httpx.MockTransport(pbx.handler),
        sleep=Sleeps(),
    )
    code = await fetch_recordings(
        client, ["a.wav", "missing.wav", "../b.wav", "c+1.wav"], tmp_path, show_progress=True
    )
    assert code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "c+1.wav"]
    err = capsys.readouterr().err.splitlines()
    assert "callvault: missing.wav: recording not found on the PBX, errno 20014" in err
    assert any(line.startswith("callvault: ../b.wav: ") for line in err)


async def test_fetch_stops_at_a_wrong_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, password_md5="0" * 32)
    client = PbxClient(
        "https://127.0.0.1:8088", "api", PASSWORD, transport=httpx.MockTransport(pbx.handler)
    )
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
    client = PbxClient(
        "https://127.0.0.1:8088",
        "api",
        PASSWORD,
        transport=httpx.MockTransport(pbx.handler),
        sleep=Sleeps(),
    )
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
    pbx = FakePbx(recordings={"a.wav": WAV})
    failures = ["503"]

    async def flaky(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/login") and failures:
            failures.pop()
            return httpx.Response(503, text="Service Unavailable")
        return await pbx.handler(request)

    client = PbxClient(
        "https://127.0.0.1:8088",
        "api",
        PASSWORD,
        transport=httpx.MockTransport(flaky),
        sleep=Sleeps(),
    )
    code = await fetch_recordings(client, ["a.wav"], tmp_path, show_progress=False)
    assert code == 0
    assert (tmp_path / "a.wav").read_bytes() == WAV
    assert capsys.readouterr().err == ""


def test_fetch_help_documents_json_output() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "callvault", "fetch", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--json" in text
    assert "name, path, size, sha256 and seconds" in text
