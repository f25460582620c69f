"""The client's guard (the archiver's lease check) is asked twice per request: before it,
and again once the connection is up, just before the request's first byte is written.

A node paused (SIGSTOP, a frozen VM) between the first check and the write must not send
the request on waking if its lease ran out meanwhile: the second check is what stops it.
Each test answers the first check "yes" and the second "no", as a lease running out in
that gap would, and looks at what the PBX (the real simulator, over HTTPS on 127.0.0.1)
received: nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from callvault.pbx import MemoryTokenStore, PSeriesClient, SessionWithdrawn, TlsOptions
from callvault.simulator import PSeriesConfig, PSeriesSimulator, Simulator
from support.pbx_fakes import Sleeps, files_in
from support.pbx_sim import outcomes, sim_client


class Lease:
    """A guard whose answers are scripted: `allow` checks pass, then the lease is gone."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.asked = 0

    def __call__(self) -> str | None:
        self.asked += 1
        return None if self.asked <= self.allow else "the lease ran out"


@pytest.fixture
def psim() -> Iterator[PSeriesSimulator]:
    with PSeriesSimulator(PSeriesConfig(seed=5)) as simulator:
        yield simulator


def pseries_client(sim: PSeriesSimulator, lease: Lease | None) -> PSeriesClient:
    assert sim.cert_sha256 is not None
    return PSeriesClient(
        sim.url,
        sim.client_id,
        sim.client_secret,
        tls=TlsOptions(pin_sha256=sim.cert_sha256),
        sleep=Sleeps(),
        clock=sim.clock.now,
        token_store=MemoryTokenStore(),
        guard=lease,
    )


async def test_a_login_is_not_sent_when_the_lease_ends_after_the_first_check(
    sim: Simulator,
) -> None:
    lease = Lease(allow=1)
    async with sim_client(sim, guard=lease) as client:
        with pytest.raises(SessionWithdrawn, match="not sent: the lease ran out"):
            await client.login()
    assert lease.asked >= 2  # before the request, and again on the open connection
    assert outcomes(sim, "login") == []


async def test_a_download_is_not_sent_when_the_lease_ends_after_the_random(
    sim: Simulator, tmp_path: Path
) -> None:
    cdr = sim.place_call(talk_seconds=2)
    assert cdr.recording is not None
    lease = Lease(allow=10**6)
    async with sim_client(sim, guard=lease) as client:
        await client.login()
        # get_random asks twice (before, and on its connection); the GET of the file once,
        # when its connection is up: the lease is gone by then.
        lease.allow = lease.asked + 2
        with pytest.raises(SessionWithdrawn, match="not sent: the lease ran out"):
            await client.download_recording(cdr.recording, tmp_path)
    assert outcomes(sim, "recording/get_random") == ["Success"]
    assert outcomes(sim, "recording/download") == []
    assert files_in(tmp_path) == []  # no file, no temporary file


async def test_with_the_lease_held_every_check_passes(sim: Simulator, tmp_path: Path) -> None:
    cdr = sim.place_call(talk_seconds=2)
    assert cdr.recording is not None
    lease = Lease(allow=10**6)
    async with sim_client(sim, guard=lease) as client:
        result = await client.download_recording(cdr.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(cdr.recording)
    # login, get_random, each before and on the connection; the file GET on its own.
    assert lease.asked >= 5


async def test_a_pseries_token_request_is_not_sent_when_the_lease_ends(
    psim: PSeriesSimulator,
) -> None:
    lease = Lease(allow=1)
    async with pseries_client(psim, lease) as client:
        with pytest.raises(SessionWithdrawn, match="not sent: the lease ran out"):
            await client.login()
    assert [path for path, _ in psim.request_log if path.endswith("get_token")] == []


async def test_a_pseries_file_get_is_not_sent_when_the_lease_ends(
    psim: PSeriesSimulator, tmp_path: Path
) -> None:
    call = psim.place_call(talk_seconds=2)
    assert call.file is not None
    lease = Lease(allow=10**6)
    async with pseries_client(psim, lease) as client:
        await client.login()
        lease.allow = lease.asked + 2  # recording/download passes; the file GET does not
        with pytest.raises(SessionWithdrawn, match="not sent: the lease ran out"):
            await client.download_recording(call.file, tmp_path)
    paths = [path for path, _ in psim.request_log]
    assert any(path.endswith("recording/download") for path in paths)
    assert not any(path.startswith("/api/download") for path in paths)
    assert files_in(tmp_path) == []
    # And with the lease held, the same download goes through, byte for byte.
    async with pseries_client(psim, None) as client:
        result = await client.download_recording(call.file, tmp_path)
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()
    assert result.sha256 == psim.recording_sha256(call.file)


async def test_a_pseries_event_subscription_is_not_sent_when_the_lease_ends(
    psim: PSeriesSimulator,
) -> None:
    lease = Lease(allow=10**6)
    async with pseries_client(psim, lease) as client:
        await client.login()
        # The upgrade passes its check; on the open WebSocket, the topic list does not.
        lease.allow = lease.asked + 1
        with pytest.raises(SessionWithdrawn, match="event subscription: not sent"):
            async with asyncio.timeout(10):
                async for _event in client.events():
                    pytest.fail("an event came without a subscription")
    assert lease.asked == lease.allow + 1
    assert psim.ws_subscribers(30012) == 0
