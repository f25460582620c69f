"""An S-Series v2 PBX whose Report Method is TCP, archived by `callvault serve`: its login
says "transport": "TCP", it posts nothing over HTTP, and serve takes its reports from a
connection to the PBX's report port (`pbx add --tcp-report-port`), reconnecting after a
break and reconciling the gap; without the port set, serve says what to do and its calls
are still found by reconciliation.

The S-Series simulator with `report_transport="tcp"` over real sockets on 127.0.0.1,
`serve` as a child process, SQLite.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from callvault.simulator import Simulator, SimulatorConfig
from support.archive import (
    ServeProcess,
    all_archived,
    registry_env,
    run_cli,
    wait_until,
)


@pytest.fixture
def tcp_pbx() -> Iterator[Simulator]:
    config = SimulatorConfig(seed=9, report_transport="tcp", call_progress_reports=False)
    with Simulator(config) as sim:
        yield sim


def _env(tmp_path: Path, sim: Simulator, **more: str) -> dict[str, str]:
    return registry_env(tmp_path, PBX_PASSWORD=sim.password, **more)


def _register(env: dict[str, str], sim: Simulator, tmp_path: Path, *more: str) -> None:
    (tmp_path / "archive").mkdir()
    created = run_cli(env, "keys", "create", "--file", str(tmp_path / "master.key"))
    assert created.returncode == 0, created.stderr
    added = run_cli(
        env,
        "pbx",
        "add",
        "berlin",
        "--url",
        sim.url,
        "--username",
        sim.username,
        "--password-env",
        "PBX_PASSWORD",
        "--api-version",
        "v2.0.0",
        "--pin-sha256",
        str(sim.cert_sha256),
        "--timezone",
        sim.config.timezone,
        *more,
    )
    assert added.returncode == 0, added.stderr


def _db(tmp_path: Path) -> Path:
    return tmp_path / "archive" / "callvault.db"


def _sources(tmp_path: Path, callids: list[str]) -> set[str]:
    """How these calls came in: "event" (a report) or "cdr" (the call history)."""
    with sqlite3.connect(tmp_path / "archive" / "callvault.db") as conn:
        rows = conn.execute("SELECT callid, source FROM calls").fetchall()
    return {source for callid, source in rows if callid in callids}


def test_serve_takes_the_reports_of_a_pbx_from_its_tcp_port(
    tcp_pbx: Simulator, tmp_path: Path
) -> None:
    # Reconciliation only when the stream broke: the calls below come from the reports.
    env = _env(tmp_path, tcp_pbx, CALLVAULT_RECONCILE_INTERVAL_S="3600")
    _register(env, tcp_pbx, tmp_path, "--tcp-report-port", str(tcp_pbx.tcp_report_port))
    serve = ServeProcess(env, tmp_path)
    tcp_pbx.place_call(talk_seconds=1)  # before serve: found by its first reconciliation
    try:
        serve.start()
        assert tcp_pbx.wait_tcp_connections(1, 30), serve.log_text()
        # Once that first reconciliation is done, only the reports can bring calls in.
        assert wait_until(lambda: "whose events were missed queued" in serve.log_text(), 30)
        calls = [tcp_pbx.place_call(talk_seconds=1) for _ in range(3)]
        names = [call.recording or "" for call in calls]
        assert wait_until(lambda: all_archived(tmp_path / "archive" / "callvault.db", names), 60), (
            serve.log_text()
        )
        assert _sources(tmp_path, [call.callid for call in calls]) == {"event"}
        assert tcp_pbx.tcp_reports_sent >= 3

        # The PBX closes the connection after its next report; the call after it is sent
        # to nobody, and the reconnected stream's gap is reconciled.
        tcp_pbx.faults.tcp_close_after_reports = 1
        first = tcp_pbx.place_call(talk_seconds=1).recording
        missed = tcp_pbx.place_call(talk_seconds=1).recording
        assert first is not None and missed is not None
        assert wait_until(
            lambda: all_archived(tmp_path / "archive" / "callvault.db", [first, missed]), 60
        ), serve.log_text()
        assert "reports resumed" in serve.log_text()
        assert tcp_pbx.password not in serve.log_text()
        assert serve.terminate() == 0
    finally:
        serve.stop()


def test_without_the_port_serve_says_what_to_set_and_reconciles(
    tcp_pbx: Simulator, tmp_path: Path
) -> None:
    env = _env(tmp_path, tcp_pbx)
    _register(env, tcp_pbx, tmp_path)
    name = tcp_pbx.place_call(talk_seconds=1).recording  # its report goes nowhere
    assert name is not None
    serve = ServeProcess(env, tmp_path)
    try:
        serve.start()
        assert wait_until(lambda: "--tcp-report-port PORT" in serve.log_text(), 30)
        assert wait_until(
            lambda: all_archived(tmp_path / "archive" / "callvault.db", [name]), 60
        ), serve.log_text()
        assert tcp_pbx.tcp_connections == 0
        assert serve.terminate() == 0
    finally:
        serve.stop()


def test_the_tcp_port_is_for_s_series_v2_only(tcp_pbx: Simulator, tmp_path: Path) -> None:
    env = _env(tmp_path, tcp_pbx)
    (tmp_path / "archive").mkdir()
    assert run_cli(env, "keys", "create", "--file", str(tmp_path / "master.key")).returncode == 0
    refused = run_cli(
        env,
        "pbx",
        "add",
        "old",
        "--url",
        tcp_pbx.url,
        "--username",
        "api",
        "--password-env",
        "PBX_PASSWORD",
        "--tcp-report-port",
        "8333",
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "v2.0.0" in refused.stderr
