"""The Yeastar Cloud PBX's token refresh, exercised inside a running archiver.

A Cloud PBX ends a token 30 minutes after it was issued unless it is renewed with
``token/refresh`` (both the token and the refresh token rotate), however busy the session
is. `PbxClient` renews it once it is REFRESH_AFTER_S old, before any request. Here the
in-process archiver (`Archiver`, the real receiver and workers) archives calls from the
simulator with ``kind="cloud"`` while hours of PBX time pass in jumps.

Two clocks move together: the PBX's (`Simulator.clock`) and the client's monotonic clock,
by which it decides when its token is due for a refresh. The archiver builds its client
itself and passes no clock, so the test hands the client one through the client's own
``clock`` parameter: the archiver's module name `PbxClient` is replaced, for the test's
duration, by a subclass whose clock defaults to the test's (`_client_clock`). It follows
real time plus the offset the test adds, as the PBX's clock does; everything else in the
archiver keeps its real clocks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callvault.archive import Archiver
from callvault.archive import _service as service_module
from callvault.pbx import PbxClient
from callvault.pbx._client import REFRESH_AFTER_S
from callvault.simulator import Faults, Simulator
from callvault.simulator._state import TOKEN_TTL_SECONDS
from support.archive import file_sha256, states, wait_until
from support.kinds import SSeriesPbx, start_pbx

STEP_S = 20 * 60.0
"""One jump of both clocks: past REFRESH_AFTER_S (the client refreshes at its next
request) and inside the PBX's 30-minute token life (the token is still good when it does)."""
STEPS = 6  # two hours of PBX time: four token lives
HEARTBEAT_S = 0.3  # the session's heartbeat (real seconds): each one may refresh


class ClientClock:
    """The client's monotonic clock: real monotonic time plus what the test added."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[SSeriesPbx]:
    """A Cloud PBX (the S-Series simulator with ``kind="cloud"``) that re-sends an
    unanswered report after 0.2 s."""
    with start_pbx(
        "cloud", seed=11, faults=Faults(), workdir=tmp_path, event_retry_interval=0.2
    ) as pbx:
        assert isinstance(pbx, SSeriesPbx) and pbx.sim.config.kind == "cloud"
        yield pbx


@pytest.fixture
def client_clock(monkeypatch: pytest.MonkeyPatch) -> ClientClock:
    """The clock of every `PbxClient` the archiver builds while the test runs."""
    clock = ClientClock()

    class ClockedPbxClient(PbxClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("clock", clock)
            super().__init__(*args, **kwargs)

    # raising=True (the default): a rename in the archiver fails here, loudly.
    monkeypatch.setattr(service_module, "PbxClient", ClockedPbxClient)
    return clock


def _advance(sim: Simulator, clock: ClientClock, seconds: float) -> None:
    """Time passes for the PBX and for the client alike."""
    sim.clock.advance(seconds)
    clock.offset += seconds


def _archived_equal(pbx: SSeriesPbx, archiver: Archiver, archive: Path, name: str) -> bool:
    """The recording `name` is archived, its stored bytes those of the PBX."""
    index = archiver.index
    assert index is not None
    row = index.recordings.by_name(name)
    if row is None or row.state != "archived" or row.storage_key is None:
        return False
    expected = pbx.recording_sha256(name)
    path = archive / row.storage_key
    return row.sha256 == expected and path.is_file() and file_sha256(path) == expected


def _place_and_archive(pbx: SSeriesPbx, archiver: Archiver, archive: Path) -> str:
    name = pbx.place_call(talk_seconds=2)
    assert name is not None
    assert wait_until(lambda: _archived_equal(pbx, archiver, archive, name), timeout=20), (
        name,
        pbx.sim.request_log[-10:],
    )
    return name


def _count(sim: Simulator, endpoint: str, outcome: str | None = None) -> int:
    return sum(
        1
        for logged, result in sim.request_log
        if logged == endpoint and (outcome is None or result == outcome)
    )


def _client(archiver: Archiver) -> PbxClient:
    lane = archiver.lanes[0]
    assert isinstance(lane.client, PbxClient)
    return lane.client


def test_the_archiver_refreshes_its_cloud_token_through_hours_of_pbx_time(
    cloud: SSeriesPbx, client_clock: ClientClock, tmp_path: Path
) -> None:
    sim = cloud.sim
    archive = tmp_path / "archive"
    assert REFRESH_AFTER_S < STEP_S < TOKEN_TTL_SECONDS
    config = cloud.archiver_config(archive, heartbeat_interval_s=HEARTBEAT_S)
    assert config.kind == "cloud"
    with Archiver(config) as archiver:
        session = archiver.session
        assert session is not None and wait_until(session.ready.is_set)
        names = [_place_and_archive(cloud, archiver, archive)]
        for step in range(1, STEPS + 1):
            refreshed = sim.state.refresh_count
            _advance(sim, client_clock, STEP_S)
            # The next heartbeat finds the token due and renews it, before the PBX ends it.
            assert wait_until(lambda r=refreshed: sim.state.refresh_count > r, timeout=10), (
                step,
                sim.request_log[-10:],
            )
            # A call placed now is reported (the renewed session keeps its report target)
            # and downloaded with the renewed token.
            names.append(_place_and_archive(cloud, archiver, archive))
        client = _client(archiver)
        assert session.health["state"] == "ok"
        index = archiver.index
        assert index is not None
        assert states(index) == {"archived": STEPS + 1}
        refreshes = sim.state.refresh_count
        # Every refresh the PBX granted was the client's, and none was refused.
        assert refreshes == client.refresh_count >= STEPS
        assert _count(sim, "token/refresh", "Success") == refreshes
        assert _count(sim, "token/refresh") == refreshes
        # One login in all: no token ever ended or was refused, over STEPS * 20 minutes.
        assert sim.login_count == 1 == client.login_count
        assert _count(sim, "login") == 1
        assert session.logins == 1
        token_errors = [
            entry for entry in sim.request_log if entry[1] in ("20004", "20005", "20006")
        ]
        assert token_errors == []
        # Downloads ran after every jump, all with a token the PBX accepted.
        assert _count(sim, "recording/download", "Success") >= len(names)
    assert len(set(names)) == STEPS + 1
    assert sorted(p.name for p in archive.rglob("*.wav")) == sorted(names)


def test_a_refused_refresh_logs_the_archiver_in_again_and_it_keeps_archiving(
    cloud: SSeriesPbx, client_clock: ClientClock, tmp_path: Path
) -> None:
    """The archiver's host slept for 31 minutes: the token ended at the PBX, and its
    refresh token with it. The client's refresh is refused (20004): it logs in again, once,
    and the archiver goes on archiving, refreshing its new token in turn."""
    sim = cloud.sim
    archive = tmp_path / "archive"
    # Heartbeats a little further apart: the jump must fall between two of them.
    config = cloud.archiver_config(archive, heartbeat_interval_s=2 * HEARTBEAT_S)
    with Archiver(config) as archiver:
        session = archiver.session
        assert session is not None and wait_until(session.ready.is_set)
        first = _place_and_archive(cloud, archiver, archive)
        assert sim.login_count == 1
        # Jump just after a heartbeat, so that the next request is the client's refresh
        # with both clocks moved (heartbeats 0.6 s apart; the jump takes microseconds).
        beats = _count(sim, "heartbeat")
        assert wait_until(lambda: _count(sim, "heartbeat") > beats, timeout=5)
        _advance(sim, client_clock, TOKEN_TTL_SECONDS + 60)
        assert wait_until(lambda: sim.login_count == 2, timeout=10), sim.request_log[-10:]
        assert wait_until(session.ready.is_set)
        # What the PBX saw: the refresh refused (its refresh token died with the token),
        # then a new login; no request met the dead token itself.
        seen = sim.request_log
        assert ("token/refresh", "20004") in seen, seen[-10:]
        refused = seen.index(("token/refresh", "20004"))
        assert ("login", "Success") in seen[refused + 1 :]
        assert [entry for entry in seen if entry[1] == "20006"] == []
        assert _count(sim, "token/refresh", "Success") == 0
        client = _client(archiver)
        assert client.refresh_count == 0 and client.login_count == 2
        # It keeps archiving: a call placed now is reported to the new session and archived.
        second = _place_and_archive(cloud, archiver, archive)
        # And the new session is refreshed in its turn, without another login.
        _advance(sim, client_clock, STEP_S)
        assert wait_until(lambda: sim.state.refresh_count == 1, timeout=10), sim.request_log[-10:]
        third = _place_and_archive(cloud, archiver, archive)
        assert client.refresh_count == 1
        assert sim.login_count == 2 == client.login_count
        assert _count(sim, "login") == 2
        assert session.health["state"] == "ok"
        index = archiver.index
        assert index is not None
        assert states(index) == {"archived": 3}
    assert sorted(p.name for p in archive.rglob("*.wav")) == sorted([first, second, third])
