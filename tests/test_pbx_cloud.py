"""The Yeastar Cloud PBX (S-Series based): refresh tokens and .yswav names, against the
simulator with ``kind="cloud"`` over real HTTPS on 127.0.0.1.

The Cloud PBX's login answers a ``refreshtoken`` beside the token; a token ends 30 minutes
after it was issued unless it is renewed with ``token/refresh`` (both rotate), whatever
the traffic. The client renews it once it is REFRESH_AFTER_S old, before any request.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from callvault.pbx import PbxClient, TlsOptions
from callvault.pbx._client import REFRESH_AFTER_S
from callvault.simulator import Simulator, SimulatorConfig
from support.pbx_fakes import Sleeps

PASSWORD = "cloud-Pa55word"


class Monotonic:
    """The client's monotonic clock, moved by the test together with the PBX's."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cloud() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(kind="cloud", password=PASSWORD, seed=3)) as sim:
        yield sim


def _client(sim: Simulator, clock: Monotonic) -> PbxClient:
    assert sim.cert_sha256 is not None
    return PbxClient(
        sim.url,
        sim.username,
        PASSWORD,
        tls=TlsOptions(pin_sha256=sim.cert_sha256),
        sleep=Sleeps(),
        clock=clock,
    )


def _advance(sim: Simulator, clock: Monotonic, seconds: float) -> None:
    sim.clock.advance(seconds)
    clock.now += seconds


def _http(sim: Simulator) -> httpx.Client:
    """A plain HTTPS client that trusts the simulator's certificate authority."""
    assert sim.ca_file is not None
    return httpx.Client(verify=ssl.create_default_context(cafile=str(sim.ca_file)))


def _login_answer(sim: Simulator) -> dict[str, str]:
    md5 = hashlib.md5(PASSWORD.encode()).hexdigest()
    with _http(sim) as http:
        answer = http.post(
            f"{sim.url}/api/v1.1.0/login",
            json={"username": sim.username, "password": md5, "port": "0"},
        )
    document: dict[str, str] = answer.json()
    return document


def test_the_cloud_pbx_ends_a_busy_token_after_30_minutes_unless_refreshed(
    cloud: Simulator,
) -> None:
    """What the client has to cope with: activity does not keep a Cloud token alive."""
    first = _login_answer(cloud)
    assert first["status"] == "Success" and len(first["refreshtoken"]) == 32
    with _http(cloud) as http:
        for _ in range(4):  # a heartbeat every 10 minutes
            cloud.clock.advance(600)
            answer = http.post(
                f"{cloud.url}/api/v1.1.0/heartbeat?token={first['token']}",
                json={"ipaddr": "127.0.0.1", "port": "0"},
            ).json()
            if answer["status"] != "Success":
                break
        assert answer == {"status": "Failed", "errno": "20006"}  # at 40 minutes: gone
        # The refresh token died with it.
        spent = http.post(
            f"{cloud.url}/api/v1.1.0/token/refresh", json={"refreshtoken": first["refreshtoken"]}
        ).json()
        assert spent == {"status": "Failed", "errno": "20004"}


def test_a_refresh_rotates_both_and_spends_the_old_ones(cloud: Simulator) -> None:
    first = _login_answer(cloud)
    with _http(cloud) as http:
        renewed = http.post(
            f"{cloud.url}/api/v1.1.0/token/refresh", json={"refreshtoken": first["refreshtoken"]}
        ).json()
        assert renewed["status"] == "Success"
        assert renewed["token"] != first["token"]
        assert renewed["refreshtoken"] != first["refreshtoken"]
        again = http.post(
            f"{cloud.url}/api/v1.1.0/token/refresh", json={"refreshtoken": first["refreshtoken"]}
        ).json()
        assert again == {"status": "Failed", "errno": "20004"}
        old = http.post(
            f"{cloud.url}/api/v1.1.0/heartbeat?token={first['token']}",
            json={"ipaddr": "127.0.0.1", "port": "0"},
        ).json()
        assert old == {"status": "Failed", "errno": "20004"}


async def test_the_client_refreshes_before_the_token_ends_and_keeps_downloading(
    cloud: Simulator, tmp_path: Path
) -> None:
    clock = Monotonic()
    cdr = cloud.place_call(talk_seconds=2)
    assert cdr.recording is not None
    async with _client(cloud, clock) as client:
        await client.login()
        # Ten-minute heartbeats for two hours: the token is renewed every 15 to 25 minutes
        # and never ends, with one login in all.
        for _ in range(12):
            _advance(cloud, clock, 600)
            await client.heartbeat()
        result = await client.download_recording(cdr.recording, tmp_path)
        assert result.sha256 == cloud.recording_sha256(cdr.recording)
        assert client.login_count == 1 == cloud.login_count
        assert client.refresh_count == cloud.state.refresh_count >= 4


async def test_a_refused_refresh_logs_in_again(cloud: Simulator, tmp_path: Path) -> None:
    clock = Monotonic()
    async with _client(cloud, clock) as client:
        await client.login()
        cloud.revoke_tokens()  # the PBX forgot the session, refresh token and all
        _advance(cloud, clock, REFRESH_AFTER_S + 1)
        await client.heartbeat()
        assert cloud.login_count == 2
        assert client.refresh_count == 0


async def test_an_s_series_pbx_is_never_refreshed(sim: Simulator) -> None:
    clock = Monotonic()
    assert sim.cert_sha256 is not None
    client = PbxClient(
        sim.url,
        sim.username,
        "integration-Pa55",
        tls=TlsOptions(pin_sha256=sim.cert_sha256),
        sleep=Sleeps(),
        clock=clock,
    )
    async with client:
        await client.login()
        _advance(sim, clock, REFRESH_AFTER_S + 60)
        await client.heartbeat()
        assert client.refresh_count == 0
        assert [name for name, _ in sim.request_log].count("token/refresh") == 0


async def test_a_yswav_recording_is_taken_by_its_body(cloud: Simulator, tmp_path: Path) -> None:
    cloud.faults.yswav_names = True
    cdr = cloud.place_call(talk_seconds=2)
    assert cdr.recording is not None and cdr.recording.endswith(".yswav")
    async with _client(cloud, Monotonic()) as client:
        result = await client.download_recording(cdr.recording, tmp_path)
    assert result.content_type == "audio/x-wav"  # the body is a WAV, whatever the name
    assert result.sha256 == cloud.recording_sha256(cdr.recording)
    assert result.path.read_bytes()[:4] == b"RIFF"
