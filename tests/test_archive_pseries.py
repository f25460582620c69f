"""A P-Series PBX archived by `callvault serve`, end to end: registered with
`callvault pbx add --kind p-series`, its calls' NewCdr events taken from its WebSocket,
its recordings fetched by download URL, its tokens kept (sealed) in the index across a
SIGKILL, and the calls of a broken event stream found again by reconciliation.

Everything real: the P-Series simulator over HTTPS and WSS on 127.0.0.1, `serve` as a
child process, SQLite.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from callvault.index import open_index
from callvault.simulator import PSeriesConfig, PSeriesSimulator
from support.archive import (
    ServeProcess,
    all_archived,
    outer_env,
    registry_env,
    run_cli,
    wait_until,
)


@pytest.fixture
def pbx() -> Iterator[PSeriesSimulator]:
    with PSeriesSimulator(PSeriesConfig(seed=5, timezone="Europe/Paris")) as sim:
        yield sim


def _env(tmp_path: Path, sim: PSeriesSimulator) -> dict[str, str]:
    return registry_env(
        tmp_path,
        CALLVAULT_TRANSIENT_BACKOFF_S="0.2",
        CALLVAULT_TRANSIENT_BACKOFF_MAX_S="1",
        CALLVAULT_RECONCILE_INTERVAL_S="600",  # only a broken stream reconciles early
        PBX_SECRET=sim.client_secret,
    )


def test_serve_archives_a_p_series_pbx_from_its_websocket(
    pbx: PSeriesSimulator, tmp_path: Path
) -> None:
    env = _env(tmp_path, pbx)
    (tmp_path / "archive").mkdir()
    created = run_cli(env, "keys", "create", "--file", str(tmp_path / "master.key"))
    assert created.returncode == 0, created.stderr
    added = run_cli(
        env,
        "pbx",
        "add",
        "lyon",
        "--kind",
        "p-series",
        "--url",
        pbx.url,
        "--client-id",
        pbx.client_id,
        "--secret-env",
        "PBX_SECRET",
        "--pin-sha256",
        str(pbx.cert_sha256),
        "--timezone",
        "Europe/Paris",
    )
    assert added.returncode == 0, added.stderr
    assert "p-series" in added.stdout and pbx.client_secret not in added.stdout
    listed = run_cli(env, "pbx", "list")
    assert "lyon" in listed.stdout and "p-series" in listed.stdout
    pbx.place_call(call_from="1001")  # a call of the last day, before serve runs
    tested = run_cli(env, "pbx", "test", "lyon", "--json")
    assert tested.returncode == 0, tested.stderr
    assert '"ok": true' in tested.stdout and '"calls_last_day": 1' in tested.stdout
    assert pbx.live_tokens() == 0  # the test's token was revoked
    tokens_before_serve = pbx.get_token_count

    db = tmp_path / "archive" / "callvault.db"
    serve = ServeProcess(env, tmp_path)
    try:
        serve.start()
        assert wait_until(lambda: pbx.ws_connections == 1, 30), serve.log_text()
        first = [pbx.place_call(talk_seconds=2), pbx.place_call(call_from="1002")]
        names = [call.file for call in first if call.file is not None]
        assert len(names) == 2
        assert wait_until(lambda: all_archived(db, names), 60), serve.log_text()
        with open_index(f"sqlite:///{db}") as index:
            for name in names:
                row = index.recordings.by_name(name)
                assert row is not None and row.sha256 == pbx.recording_sha256(name)
            [entry] = index.pbxs.list()
            assert entry.config.kind == "p-series"
            sealed = index.pbxs.load_tokens(entry.id)
        assert sealed is not None  # kept, sealed: no token in clear in the index
        assert all(token not in sealed for token in pbx.state.access)
        assert pbx.get_token_count == tokens_before_serve + 1

        # A SIGKILL: the next run reuses the token kept in the index, spending none of
        # the application's eight.
        serve.kill()
        serve.start()
        assert wait_until(lambda: pbx.ws_connections == 1, 30), serve.log_text(2)
        later = pbx.place_call(call_from="1005")
        assert later.file is not None
        assert wait_until(lambda: all_archived(db, [later.file or ""]), 60), serve.log_text(2)
        assert pbx.get_token_count == tokens_before_serve + 1

        # The PBX restarts: its tokens and the WebSocket are gone, and the call placed
        # meanwhile is never sent. The stream comes back with a new token and the gap is
        # reconciled from the call history.
        pbx.restart()
        missed = pbx.place_call(call_from="1007")
        assert missed.file is not None
        assert wait_until(lambda: all_archived(db, [missed.file or ""]), 60), serve.log_text(2)
        assert "events resumed" in serve.log_text(2)
        assert pbx.client_secret not in serve.log_text()
        assert serve.terminate() == 0
    finally:
        serve.stop()


def test_fetch_and_cdr_speak_to_a_p_series_pbx(pbx: PSeriesSimulator, tmp_path: Path) -> None:
    env = outer_env()
    env.update(
        {
            "CALLVAULT_KIND": "p-series",
            "CALLVAULT_PBX": pbx.url,
            "CALLVAULT_USERNAME": pbx.client_id,
            "CALLVAULT_PASSWORD": pbx.client_secret,
            "CALLVAULT_PIN_SHA256": str(pbx.cert_sha256),
            "CALLVAULT_TIMEZONE": "Europe/Paris",
        }
    )
    call = pbx.place_call(call_from="1004", call_to="1009", talk_seconds=3)
    assert call.file is not None
    fetched = run_cli(env, "fetch", "--json", "--out", str(tmp_path / "out"), call.file)
    assert fetched.returncode == 0, fetched.stderr
    assert pbx.recording_sha256(call.file) in fetched.stdout
    saved = tmp_path / "out" / call.file
    assert saved.read_bytes()[:4] == b"RIFF"
    # An hour back (not "today": the call may have started before midnight).
    since = (datetime.now(ZoneInfo("Europe/Paris")) - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M")
    listed = run_cli(env, "cdr", "--since", since, "--json")
    assert listed.returncode == 0, listed.stderr
    assert call.file in listed.stdout and "1009" in listed.stdout
    assert pbx.client_secret not in fetched.stdout + fetched.stderr + listed.stderr
    wrong = run_cli({**env, "CALLVAULT_PASSWORD": "not-the-secret"}, "cdr", "--since", since)
    assert wrong.returncode != 0
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr  # one line, no traceback
