"""The archiver end to end: the real simulator over HTTPS, the real receiver on 127.0.0.1.

Calls placed on the simulated PBX push NewCdr to the archiver, whose workers download
each recording and store it; the test compares the archived bytes with the simulator's.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from callvault.archive import Archiver, ArchiverConfig, RetryPolicy
from callvault.index import Index, SettingKey, open_index
from callvault.pbx import EventFormat, TlsOptions
from callvault.simulator import Faults, Simulator, SimulatorConfig
from callvault.simulator._events import newcdr_body

FAST_POLICY = RetryPolicy(
    not_found_schedule_s=(0.2, 0.3, 0.5),
    missing_after_s=2.0,
    missing_min_attempts=4,
    old_call_min_attempts=3,
    transient_base_s=0.1,
    transient_max_s=0.5,
    transient_max_attempts=20,
    jitter=0.1,
)


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def archiver_config(sim: Simulator, archive: Path, **overrides: object) -> ArchiverConfig:
    config = ArchiverConfig(
        pbx_url=sim.url,
        username=sim.username,
        password=sim.password,
        archive=archive,
        tls=TlsOptions(pin_sha256=sim.cert_sha256),
        events_host="127.0.0.1",
        events_port=0,
        timezone=ZoneInfo(sim.config.timezone),
        policy=FAST_POLICY,
        poll_interval_s=0.2,
        job_lease_s=30.0,
        reconcile_at_start=False,
        client_backoff_base=0.05,
        client_backoff_max=0.2,
        shutdown_grace_s=5.0,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(seed=7, event_retry_interval=0.2)) as running:
        yield running


def states(index: Index) -> dict[str, int]:
    return {k: v for k, v in index.recordings.counts_by_state().items() if v}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_event_to_archived_bytes_equal_the_pbx(sim: Simulator, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    with Archiver(archiver_config(sim, archive)) as archiver:
        cdrs = [
            sim.place_call(callfrom="1001", callto="1003", talk_seconds=2),
            sim.place_call(
                callfrom="1002", callto="+4915112345678", type="Outbound", talk_seconds=3
            ),
            sim.place_call(callfrom="1004", callto="1005", status="NO ANSWER"),
        ]
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
        assert archiver.session is not None and archiver.session.health["state"] == "ok"
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        for cdr in cdrs[:2]:
            assert cdr.recording is not None
            row = index.recordings.by_name(cdr.recording)
            assert row is not None and row.state == "archived"
            assert row.storage_key is not None and row.sha256 == sim.recording_sha256(cdr.recording)
            path = archive / row.storage_key
            assert path.is_file() and file_sha256(path) == row.sha256
            assert row.storage_key.startswith(f"{sim.serial}/")
            assert row.size == path.stat().st_size
        health = index.settings.get(SettingKey.PBX_HEALTH)
        assert health is not None and '"state"' in health
    staging = archive / ".callvault-incoming"
    assert not staging.exists() or list(staging.iterdir()) == []


def test_duplicate_events_archive_once(sim: Simulator, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    with Archiver(archiver_config(sim, archive)) as archiver:
        cdr = sim.place_call(talk_seconds=2)
        assert cdr.recording is not None
        body = newcdr_body(cdr, EventFormat.V1_0_2)
        for _ in range(5):
            assert httpx.post(archiver.events_url, content=body).status_code == 200
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 1})
        time.sleep(0.5)  # re-sent events after archiving must not reset it
        for _ in range(3):
            assert httpx.post(archiver.events_url, content=body).status_code == 200
        row = index.recordings.by_name(cdr.recording)
        assert row is not None and row.state == "archived" and row.attempts == 1
        assert archiver.pool is not None and archiver.pool.archived == 1
    assert len(list(archive.rglob("*.wav"))) == 1


def test_not_ready_then_ready(tmp_path: Path) -> None:
    faults = Faults(not_ready_seconds=1.0)
    with Simulator(SimulatorConfig(seed=3, faults=faults, event_retry_interval=0.2)) as sim:
        archive = tmp_path / "archive"
        with Archiver(archiver_config(sim, archive)) as archiver:
            cdr = sim.place_call(talk_seconds=2)
            assert cdr.recording is not None
            index = archiver.index
            assert index is not None
            assert wait_until(lambda: states(index) == {"archived": 1}, timeout=15)
            row = index.recordings.by_name(cdr.recording)
            assert row is not None and row.attempts >= 2  # at least one "not ready" first
            assert row.sha256 == sim.recording_sha256(cdr.recording)
            assert row.missing_since is None and row.last_error is None


def test_missing_after_the_bound_with_the_reason(sim: Simulator, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    with Archiver(archiver_config(sim, archive)) as archiver:
        sim.faults.delete_rate = 1.0
        cdr = sim.place_call(talk_seconds=2)
        sim.faults.delete_rate = 0.0
        kept = sim.place_call(talk_seconds=2)
        assert cdr.recording is not None and kept.recording is not None
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 1, "missing": 1}, timeout=20), (
            states(index)
        )
        row = index.recordings.by_name(cdr.recording)
        assert row is not None and row.state == "missing"
        assert row.last_error is not None and "does not exist" in row.last_error
        assert "20014" in row.last_error
        assert row.attempts >= FAST_POLICY.missing_min_attempts
    assert not list(archive.rglob(cdr.recording))


def test_transient_faults_are_retried_until_archived(tmp_path: Path) -> None:
    with Simulator(SimulatorConfig(seed=5, event_retry_interval=0.2)) as sim:
        archive = tmp_path / "archive"
        with Archiver(archiver_config(sim, archive)) as archiver:
            assert archiver.session is not None
            assert wait_until(archiver.session.ready.is_set)
            # Downloads dropped mid-body, then 5xx and HTML pages on the API calls.
            sim.faults.drop_next_downloads = 3
            sim.faults.error_5xx_next = 2
            sim.faults.html_error_next = 1
            cdrs = [sim.place_call(talk_seconds=2) for _ in range(3)]
            index = archiver.index
            assert index is not None
            assert wait_until(lambda: states(index) == {"archived": 3}, timeout=30), states(index)
            for cdr in cdrs:
                assert cdr.recording is not None
                row = index.recordings.by_name(cdr.recording)
                assert row is not None and row.sha256 == sim.recording_sha256(cdr.recording)


def test_reboot_and_revoked_tokens_lead_to_relogin(sim: Simulator, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    config = archiver_config(sim, archive, heartbeat_interval_s=0.3)
    with Archiver(config) as archiver:
        index = archiver.index
        session = archiver.session
        assert index is not None and session is not None
        sim.place_call(talk_seconds=1)
        assert wait_until(lambda: states(index) == {"archived": 1})
        logins = session.logins
        sim.reboot()  # tokens gone, BootUp pushed: the session logs in again
        assert wait_until(lambda: session.logins > logins, timeout=10)
        # Tokens revoked without a report: events stop until the next heartbeat's token
        # error makes the client log in again.
        pbx_logins = sim.login_count
        sim.revoke_tokens()
        assert wait_until(lambda: sim.login_count > pbx_logins, timeout=10)
        sim.place_call(talk_seconds=1)
        assert wait_until(lambda: states(index) == {"archived": 2}, timeout=15), states(index)
        assert session.health["state"] == "ok"
