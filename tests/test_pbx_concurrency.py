"""Concurrent downloads on one PbxClient, seen from the server side.

Downloads hold the session gate shared from their get_random until their GET's headers
arrive, so several are in that critical section at once; a (re-)login holds it exclusive,
so it never falls between a random and the GET that uses it, is not starved by a stream of
downloads, and a cancelled waiter on either side leaves nothing stuck.

Which path each test exercises: the scripted fake PBX behind a real HTTP server on
127.0.0.1 (each request in its own thread, so a hook may block one request while others go
on), or the simulator over HTTPS; no transport is injected, so every download goes through
the socket pump.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from callvault.pbx import PbxClient
from callvault.simulator import Simulator
from callvault.simulator._app import Outcome, PbxHttp
from support.pbx_fakes import (
    PASSWORD,
    WAV,
    ClientFactory,
    FakePbx,
    Sleeps,
    assert_randoms_used_in_their_session,
    make_wav,
    serve_fake_pbx,
)
from support.pbx_sim import sim_client

NAMES = ["a.wav", "b.wav", "c.wav"]


def recordings(names: list[str]) -> dict[str, bytes]:
    # Each its own bytes, so a mix-up between concurrent downloads would show.
    return {name: make_wav(800 + i) for i, name in enumerate(names)}


@pytest.fixture
def fake() -> Iterator[tuple[FakePbx, Callable[..., PbxClient]]]:
    pbx = FakePbx(recordings=recordings(NAMES + [f"r{i}.wav" for i in range(6)]))
    with serve_fake_pbx(pbx) as base:

        def connect(**kwargs: Any) -> PbxClient:
            kwargs.setdefault("sleep", Sleeps())
            return PbxClient(base, "api", PASSWORD, **kwargs)

        yield pbx, connect


def get_randoms(pbx: FakePbx) -> list[str]:
    return [c.body["recording"] for c in pbx.calls if c.endpoint == "recording/get_random"]


def block_get_random_of(pbx: FakePbx, name: str) -> threading.Event:
    """Hold the answer to `name`'s get_random (its download is then inside its critical
    section) until the returned event is set."""
    let_go = threading.Event()

    def hook(recording: str) -> None:
        if recording == name:
            let_go.wait(10)

    pbx.on_get_random = hook
    return let_go


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def test_each_random_is_used_in_its_own_session_and_body_streams_unlocked(
    tmp_path: Path, connect: ClientFactory
) -> None:
    """Downloads run concurrently; the gate covers get_random..headers, not the body."""
    names = [f"r{i}.wav" for i in range(4)]
    pbx = FakePbx(recordings=dict.fromkeys(names, WAV))
    release = threading.Event()  # set from the fake's handler, in the server's thread
    pbx.hold_download_body = release
    seen: list[str] = []

    def on_get_random(name: str) -> None:
        seen.append(name)
        if len(seen) == len(names):
            release.set()  # only reachable if earlier bodies did not hold the gate

    pbx.on_get_random = on_get_random
    async with connect(pbx) as client:
        await client.login()
        pbx.tokens.clear()  # forces a re-login in the middle of everything
        results = await asyncio.wait_for(
            asyncio.gather(*(client.download_recording(n, tmp_path) for n in names)), 10
        )
    assert sorted(r.name for r in results) == names
    assert assert_randoms_used_in_their_session(pbx) == pbx.count("recording/download")
    assert pbx.count("recording/download") >= len(names)


async def test_two_downloads_are_in_their_critical_sections_at_once(
    fake: tuple[FakePbx, Callable[..., PbxClient]], tmp_path: Path
) -> None:
    """a's get_random is answered only once b's has arrived: with one download at a time
    between get_random and GET, b could not ask before a's GET was answered."""
    pbx, connect = fake
    b_asked = threading.Event()
    overlapped: list[bool] = []

    def hook(recording: str) -> None:
        if recording == "b.wav":
            b_asked.set()
        elif recording == "a.wav":
            overlapped.append(b_asked.wait(5))

    pbx.on_get_random = hook
    async with connect() as client:
        await client.login()
        first = asyncio.create_task(client.download_recording("a.wav", tmp_path))
        await until(lambda: get_randoms(pbx) == ["a.wav"])
        second = asyncio.create_task(client.download_recording("b.wav", tmp_path))
        results = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert overlapped == [True]
    flow = [c.endpoint for c in pbx.calls]
    assert flow[:3] == ["login", "recording/get_random", "recording/get_random"]
    assert flow.count("recording/download") == 2
    for result in results:
        assert result.path.read_bytes() == pbx.recordings[result.name]
    assert assert_randoms_used_in_their_session(pbx) == 2


async def test_relogins_among_concurrent_downloads_never_split_a_random_from_its_get(
    fake: tuple[FakePbx, Callable[..., PbxClient]], tmp_path: Path
) -> None:
    """The PBX forgets every token in the middle of each round of six downloads, while one
    download is held inside its critical section (its get_random answer waits up to 0.3 s
    for a login to arrive, which must not happen). The failing downloads share one re-login,
    and on the server's log each GET carries the token that asked for its random, with no
    login in between."""
    pbx, connect = fake
    names = [f"r{i}.wav" for i in range(6)]
    rounds = 3
    asked = 0

    def hook(recording: str) -> None:
        nonlocal asked
        asked += 1
        if asked % 100 == 3:  # once per round (a round asks fewer than 100 times)
            logins = pbx.count("login")
            pbx.tokens.clear()
            deadline = time.monotonic() + 0.3
            while pbx.count("login") == logins and time.monotonic() < deadline:
                time.sleep(0.01)

    pbx.on_get_random = hook
    async with connect() as client:
        for n in range(rounds):
            asked = 100 * n
            out = tmp_path / str(n)
            results = await asyncio.wait_for(
                asyncio.gather(*(client.download_recording(name, out) for name in names)), 20
            )
            assert sorted(r.name for r in results) == names
            for result in results:
                assert result.path.read_bytes() == pbx.recordings[result.name]
    assert pbx.count("login") == 1 + rounds  # the first one, then one shared per round
    failed = pbx.count("recording/download") - rounds * len(names)
    assert failed > 0  # some GETs did meet a forgotten token
    assert assert_randoms_used_in_their_session(pbx) == pbx.count("recording/download")


async def test_relogin_waits_for_the_critical_section_and_keeps_new_downloads_out(
    fake: tuple[FakePbx, Callable[..., PbxClient]], tmp_path: Path
) -> None:
    pbx, connect = fake
    let_a_go = block_get_random_of(pbx, "a.wav")
    async with connect() as client:
        await client.login()
        a = asyncio.create_task(client.download_recording("a.wav", tmp_path))
        await until(lambda: get_randoms(pbx) == ["a.wav"])
        relogin = asyncio.create_task(client.login())
        await asyncio.sleep(0.2)
        assert not relogin.done()
        assert pbx.count("login") == 1  # waits for a's critical section
        b = asyncio.create_task(client.download_recording("b.wav", tmp_path))
        await asyncio.sleep(0.2)
        assert get_randoms(pbx) == ["a.wav"]  # b may not overtake the waiting re-login
        let_a_go.set()
        await asyncio.wait_for(asyncio.gather(a, relogin, b), 10)
    flow = [(c.endpoint, c.body.get("recording") or c.query.get("recording")) for c in pbx.calls]
    assert flow[:6] == [
        ("login", None),
        ("recording/get_random", "a.wav"),
        ("recording/download", "a.wav"),
        ("login", None),
        ("recording/get_random", "b.wav"),
        ("recording/download", "b.wav"),
    ]
    assert assert_randoms_used_in_their_session(pbx) == 2
    assert (tmp_path / "b.wav").read_bytes() == pbx.recordings["b.wav"]


async def test_a_cancelled_relogin_lets_the_downloads_behind_it_in(
    fake: tuple[FakePbx, Callable[..., PbxClient]], tmp_path: Path
) -> None:
    pbx, connect = fake
    let_a_go = block_get_random_of(pbx, "a.wav")
    try:
        async with connect() as client:
            await client.login()
            a = asyncio.create_task(client.download_recording("a.wav", tmp_path))
            await until(lambda: get_randoms(pbx) == ["a.wav"])
            relogin = asyncio.create_task(client.login())
            await asyncio.sleep(0.05)
            b = asyncio.create_task(client.download_recording("b.wav", tmp_path))
            await asyncio.sleep(0.1)
            assert get_randoms(pbx) == ["a.wav"]
            relogin.cancel()
            with pytest.raises(asyncio.CancelledError):
                await relogin
            # b gets in while a still holds the gate shared; the re-login was never sent.
            await asyncio.wait_for(b, 5)
            assert not a.done()
            let_a_go.set()
            await asyncio.wait_for(a, 5)
            assert pbx.count("login") == 1
            await asyncio.wait_for(client.login(), 5)  # the gate is free for a writer again
    finally:
        let_a_go.set()
    assert pbx.count("login") == 2
    assert (tmp_path / "b.wav").read_bytes() == pbx.recordings["b.wav"]


async def test_a_download_cancelled_while_waiting_for_the_gate_leaves_nothing_held(
    fake: tuple[FakePbx, Callable[..., PbxClient]], tmp_path: Path
) -> None:
    pbx, connect = fake
    let_a_go = block_get_random_of(pbx, "a.wav")
    try:
        async with connect() as client:
            await client.login()
            a = asyncio.create_task(client.download_recording("a.wav", tmp_path))
            await until(lambda: get_randoms(pbx) == ["a.wav"])
            relogin = asyncio.create_task(client.login())
            await asyncio.sleep(0.05)
            b = asyncio.create_task(client.download_recording("b.wav", tmp_path / "b"))
            await asyncio.sleep(0.1)
            b.cancel()
            with pytest.raises(asyncio.CancelledError):
                await b
            let_a_go.set()
            await asyncio.wait_for(asyncio.gather(a, relogin), 5)
            # Both sides of the gate still work: a download, then a re-login.
            c = await asyncio.wait_for(client.download_recording("c.wav", tmp_path), 5)
            await asyncio.wait_for(client.login(), 5)
    finally:
        let_a_go.set()
    assert "b.wav" not in get_randoms(pbx)
    assert not (tmp_path / "b").exists() or list((tmp_path / "b").iterdir()) == []
    assert c.path.read_bytes() == pbx.recordings["c.wav"]
    assert pbx.count("login") == 3


# ------------------------------------------------------------ the simulator


async def test_downloads_overlap_against_the_simulator(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two downloads started together. The simulator answers the first get_random to arrive
    only once it has answered the second: with one download at a time between get_random
    and GET, the second could not ask before the first's GET was answered (the first waits
    10 s in vain, and the log reads get_random, download, get_random, download)."""
    names = [sim.place_call(callfrom=f"100{i}", callto="1099").recording or "" for i in range(2)]
    assert all(names)
    assert sim.cert_sha256 is not None
    real_get_random = PbxHttp.recording_get_random
    arrived: list[str] = []
    second_answered = threading.Event()
    overlapped: list[bool] = []

    async def get_random(http: PbxHttp, request: Request, version: str) -> Outcome:
        arrived.append(request.url.path)  # on the simulator's event loop: one at a time
        if len(arrived) == 1:
            overlapped.append(await asyncio.to_thread(second_answered.wait, 10))
            return await real_get_random(http, request, version)
        try:
            return await real_get_random(http, request, version)
        finally:
            second_answered.set()

    monkeypatch.setattr(PbxHttp, "recording_get_random", get_random)
    async with sim_client(sim) as client:
        await client.login()
        results = await asyncio.wait_for(
            asyncio.gather(*(client.download_recording(n, tmp_path) for n in names)), 30
        )
    assert overlapped == [True]
    api = [e for e, _ in sim.request_log if e in ("recording/get_random", "recording/download")]
    assert api == ["recording/get_random"] * 2 + ["recording/download"] * 2
    assert [o for e, o in sim.request_log if e.startswith("recording/")] == ["Success"] * 4
    for result in results:
        assert result.sha256 == sim.recording_sha256(result.name)
