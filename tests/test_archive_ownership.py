"""Which node works on which PBX (`Ownership`), on SQLite and PostgreSQL, with clocks of
the test's own: the PBXs are spread over the live nodes, a node that joins gets its share,
a dead node's PBXs are taken over once their leases expire, and a node that was paused
stops talking to its PBXs before anything else, then finds it has lost them."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from callvault.archive._ownership import MAX_STARTING, Ownership
from callvault.archive._service import _supervised
from callvault.index import Index, Lease
from callvault.ops import remove_pbx
from support.index_data import register_pbx

TTL_S, RENEW_S = 15.0, 5.0


@dataclass
class Clock:
    """Wall and monotonic time of one node, moved by the test."""

    # Real time to start with: a registration far from it would look like one of a
    # process that started later with the same pid, taken for dead.
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    mono: float = 1000.0

    def wall(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


@dataclass
class FakeLane:
    """A lane that only notes when its work starts and stops."""

    pbx_id: int
    name: str
    lease: Lease | None = None
    lease_deadline: float = 0.0
    events: list[str] = field(default_factory=list)
    fenced_by_workers: str | None = None

    async def start_work(self) -> None:
        self.events.append("start")

    async def stop_work(self, *, reason: str, graceful: bool) -> None:
        self.events.append("stop" if graceful else "stop-at-once")

    def work_fenced(self) -> str | None:
        return self.fenced_by_workers


def node(index: Index, name: str, pbx_ids: list[int], clock: Clock) -> Ownership:
    lanes = [FakeLane(pbx_id, f"pbx{pbx_id}") for pbx_id in pbx_ids]
    return Ownership(
        index,
        lanes,
        node=name,
        ttl_s=TTL_S,
        renew_s=RENEW_S,
        clock=clock.wall,
        monotonic=clock.monotonic,
    )


def held(ownership: Ownership) -> set[int]:
    return {lane.pbx_id for lane in ownership.held()}


def holders(index: Index, now: datetime) -> dict[int, str | None]:
    return {lease.pbx_id: lease.node if lease.held(now) else None for lease in index.leases.all()}


async def test_alone_a_node_works_on_every_pbx_and_hands_them_over_at_shutdown(
    index: Index,
) -> None:
    ids = [register_pbx(index, f"p{i}").id for i in range(4)]
    clock = Clock()
    a = node(index, "a", ids, clock)
    await a.register()
    await a.tick()
    assert held(a) == set(ids) and a.live_nodes == 1
    assert all(a.may_talk(lane) is None for lane in a.held())
    await a.close()
    assert holders(index, clock.now) == dict.fromkeys(ids)
    assert [info.kind for info in index.processes.all() if info.stopped_at is None] == []


async def test_a_node_that_joins_gets_its_share(index: Index) -> None:
    ids = [register_pbx(index, f"p{i}").id for i in range(5)]
    clock = Clock()
    a, b = node(index, "a", ids, clock), node(index, "b", ids, clock)
    await a.register()
    await a.tick()
    await b.register()
    await b.tick()  # all held by a: b waits
    assert held(b) == set()
    clock.advance(RENEW_S)
    await a.tick()  # two live nodes: a keeps ceil(5/2) = 3 and hands the newest 2 over
    await a.settle()  # (in the background: their downloads may finish first)
    await b.tick()
    assert len(held(a)) == 3 and len(held(b)) == 2
    assert held(a) | held(b) == set(ids)
    released = [lane for lane in a._lanes if lane.lease is None]
    assert all(lane.events == ["start", "stop"] for lane in released)  # a clean hand-over


async def test_a_dead_nodes_pbxs_are_taken_over_once_their_leases_expire(index: Index) -> None:
    ids = [register_pbx(index, f"p{i}").id for i in range(4)]
    clock = Clock()  # one time for both: a paused process's clocks go on too
    a, b = node(index, "a", ids, clock), node(index, "b", ids, clock)
    for ownership in (a, b):
        await ownership.register()
    await a.tick()
    await b.tick()
    await a.tick()
    await a.settle()
    await b.tick()
    assert len(held(a)) == 2 and len(held(b)) == 2
    a_had = held(a)
    # a stops ticking (killed, or paused); b goes on. Before a's leases expire b takes
    # nothing of a's; within a lease and a renewal it has them all.
    taken_after = None
    for step in range(1, 13):
        clock.advance(RENEW_S)
        await b.tick()
        if taken_after is None and held(b) == set(ids):
            taken_after = step * RENEW_S
        elif taken_after is None:
            assert held(b).isdisjoint(a_had)
    assert taken_after is not None and TTL_S <= taken_after <= TTL_S + RENEW_S
    assert b.live_nodes == 1
    assert set(holders(index, clock.now).values()) == {"b"}
    tokens = {lease.pbx_id: lease.token for lease in index.leases.all()}
    assert all(tokens[pbx_id] == 2 for pbx_id in a_had)

    # a wakes up 60 s later: it may not talk to its PBXs, before its first tick even...
    assert all(a.may_talk(lane) is not None for lane in a.held())
    await a.tick()
    # ... and its first tick stops them at once: they are b's.
    assert held(a) == set()
    for lane in a._lanes:
        if lane.pbx_id in a_had:
            assert lane.events == ["start", "stop-at-once"]
    assert set(holders(index, clock.now).values()) == {"b"}
    # Two live nodes again: b hands two back in a clean way, and a takes them.
    clock.advance(RENEW_S)
    await b.tick()
    await b.settle()
    await a.tick()
    assert len(held(a)) == 2 and len(held(b)) == 2 and held(a) | held(b) == set(ids)


async def test_a_lease_another_node_took_stops_its_work_at_once(index: Index) -> None:
    [pbx_id] = [register_pbx(index, "p0").id]
    clock = Clock()
    a = node(index, "a", [pbx_id], clock)
    await a.register()
    await a.tick()
    [lane] = a.held()
    # Another node took it (as if a's lease had run out unnoticed): a's renewal fails.
    clock.advance(TTL_S + 1)
    await node(index, "b", [pbx_id], clock).register()
    assert index.leases.acquire(pbx_id, node="b", now=clock.now, ttl=timedelta(minutes=5))
    clock.mono -= TTL_S  # a's own clock says its lease still holds
    await a.tick()
    assert held(a) == set() and lane.events == ["start", "stop-at-once"]


async def test_workers_fenced_by_another_process_give_the_pbx_up(index: Index) -> None:
    [pbx_id] = [register_pbx(index, "p0").id]
    clock = Clock()
    a = node(index, "a", [pbx_id], clock)
    await a.register()
    await a.tick()
    await a.settle()  # its work started (in the background)
    [lane] = a.held()
    assert isinstance(lane, FakeLane)
    lane.fenced_by_workers = "process 9 was marked stopped by another process"
    clock.advance(RENEW_S)
    await a.tick()
    assert lane.events[:2] == ["start", "stop-at-once"]


async def test_a_newer_start_of_the_same_node_takes_over_and_fences_the_old(
    index: Index,
) -> None:
    [pbx_id] = [register_pbx(index, "p0").id]
    clock = Clock()
    old, new = node(index, "a", [pbx_id], clock), node(index, "a", [pbx_id], clock)
    await old.register()
    await old.tick()
    await new.register()  # supersedes old's node row
    await new.tick()  # and takes its PBX back at once (same node), with a new token
    assert held(new) == {pbx_id}
    await old.tick()
    assert old.fenced.is_set() and held(old) == set()
    assert "marked stopped" in (old.fenced_reason or "")


def test_the_lease_is_renewed_more_often_than_it_lasts(index: Index) -> None:
    with pytest.raises(ValueError, match="renewed more often"):
        Ownership(index, [], node="a", ttl_s=5, renew_s=5)


async def test_the_pbxs_of_a_node_the_registry_knows_stopped_are_taken_at_once(
    index: Index,
) -> None:
    ids = [register_pbx(index, f"p{i}").id for i in range(2)]
    clock = Clock()
    a, b = node(index, "a", ids, clock), node(index, "b", ids, clock)
    await a.register()
    await a.tick()
    assert a.registration is not None
    # a was killed, and a start on its host found its pid gone (see reap_dead_local).
    index.processes.stop(a.registration.process_id, now=clock.now)
    await b.register()
    await b.tick()
    assert held(b) == set(ids)


async def test_a_slow_hand_over_does_not_hold_up_the_renewals(index: Index) -> None:
    """Handing a PBX over waits for its downloads (up to the shutdown grace); meanwhile the
    other leases are renewed on time, and so is the one being handed over."""
    ids = [register_pbx(index, f"p{i}").id for i in range(4)]
    clock = Clock()
    a, b = node(index, "a", ids, clock), node(index, "b", ids, clock)
    await a.register()
    await a.tick()
    finish = asyncio.Event()

    async def slow_stop(*, reason: str, graceful: bool) -> None:
        await finish.wait()

    for lane in a._lanes:
        lane.stop_work = slow_stop  # type: ignore[method-assign]
    await b.register()
    clock.advance(RENEW_S)
    await a.tick()  # starts handing two over, and does not wait for them
    assert len(held(a)) == 2
    for _ in range(4):  # longer than a lease: still renewed, none taken by b
        clock.advance(RENEW_S)
        await asyncio.wait_for(a.tick(), 5)
        await b.tick()
        assert set(holders(index, clock.now).values()) == {"a"}
    finish.set()
    await a.settle()
    await b.tick()
    assert len(held(a)) == 2 and len(held(b)) == 2


async def test_a_round_stopped_while_taking_a_pbx_gives_the_lease_back(
    index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels the round mid-statement: the lease it won in the index anyway is
    released, not left held by a node that no longer knows it has it."""
    ids = [register_pbx(index, f"p{i}").id for i in range(2)]
    clock = Clock()
    a = node(index, "a", ids, clock)
    await a.register()
    acquire = index.leases.acquire_many
    entered = threading.Event()

    def slow_acquire(*args: Any, **kwargs: Any) -> list[Lease]:
        entered.set()
        time.sleep(0.3)
        return acquire(*args, **kwargs)

    monkeypatch.setattr(index.leases, "acquire_many", slow_acquire)
    round_ = asyncio.create_task(a.tick())
    assert await asyncio.to_thread(entered.wait, 5)
    round_.cancel()
    with pytest.raises(asyncio.CancelledError):
        await round_
    await asyncio.sleep(0.6)  # the statement has ended on its thread by now, either way
    assert held(a) == set()
    assert set(holders(index, clock.now).values()) <= {None}
    await a.close()


async def test_taking_many_pbxs_never_holds_up_a_round(index: Index) -> None:
    """Starting work on a PBX takes time (here 0.3 s each): the leases are won at once, in
    one round; the work starts in the background, MAX_STARTING at once, and the rounds
    never wait for it, so the leases held are renewed on time."""
    ids = [register_pbx(index, f"p{i}").id for i in range(MAX_STARTING + 4)]
    clock = Clock()
    a = node(index, "a", ids, clock)
    running = 0
    most = 0
    started: list[int] = []

    def slow_start(lane_id: int) -> Callable[[], Awaitable[None]]:
        async def start() -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.3)
            running -= 1
            started.append(lane_id)

        return start

    for lane in a._lanes:
        lane.start_work = slow_start(lane.pbx_id)  # type: ignore[method-assign]
    await a.register()
    for _ in range(2):
        round_started = time.monotonic()
        await a.tick()
        assert time.monotonic() - round_started < 0.25  # no wait for the starts
        assert len(held(a)) == len(ids)  # every lease won in the first round
        clock.advance(RENEW_S)
    assert started == []  # still starting
    await a.settle()
    assert sorted(started) == sorted(ids) and most == MAX_STARTING
    # A lease lost while its work is starting: the start is called off first.
    lost = a._lanes[0]
    await a._lose(lost, "test")
    assert lost.lease is None and lost.events[-1] == "stop-at-once"
    await a.close()


async def test_a_pbx_taken_off_the_registry_leaves_the_others_leases_alone(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    """`callvault pbx remove` while the loop runs (supervised as serve does, on real clocks
    and a short lease): the removed PBX's lease row goes with its entry. Its lane stops with
    one INFO line (not "another node holds it"), it is never taken again (no lease can be
    made for a PBX that is gone), and the other PBXs' leases are renewed every round:
    never expired, never lost and taken back."""
    ttl_s, renew_s = 1.0, 0.1
    names = ["sim-1", "sim-2", "sim-3", "dummy"]
    ids = [register_pbx(index, name).id for name in names]
    lanes = [FakeLane(pbx_id, name) for pbx_id, name in zip(ids, names, strict=True)]
    a = Ownership(index, lanes, node="vm", ttl_s=ttl_s, renew_s=renew_s)
    await a.register()
    await a.tick()
    await a.settle()
    assert held(a) == set(ids)
    kept, dummy = lanes[:3], lanes[3]
    tokens = {lane.pbx_id: lane.lease.token for lane in kept if lane.lease is not None}
    stop = asyncio.Event()
    loop = asyncio.create_task(_supervised("the PBX leases", lambda: a.run(stop), stop))
    try:
        with caplog.at_level(logging.INFO, logger="callvault.archive"):
            await asyncio.sleep(3 * renew_s)
            await asyncio.to_thread(remove_pbx, index, "dummy", actor="test", remote_addr="")
            removed_at = time.monotonic()
            expiries: dict[int, list[datetime]] = {lane.pbx_id: [] for lane in kept}
            # Two leases long: a round missed, or a restart of the loop, would show.
            while time.monotonic() - removed_at < 2 * ttl_s:
                now = datetime.now(UTC)
                for lane in kept:
                    assert a.may_talk(lane) is None, lane.name
                    lease = await asyncio.to_thread(index.leases.get, lane.pbx_id)
                    assert lease is not None and lease.node == "vm" and lease.held(now)
                    assert lease.token == tokens[lane.pbx_id]  # never lost and taken back
                    assert lease.expires_at is not None
                    expiries[lane.pbx_id].append(lease.expires_at)
                await asyncio.sleep(renew_s)
    finally:
        stop.set()
        await loop
        await a.close()
    for lane in kept:
        assert lane.events == ["start", "stop"], lane.name  # the close's hand-over only
        assert expiries[lane.pbx_id][-1] > expiries[lane.pbx_id][0]  # renewed
    assert dummy.events == ["start", "stop-at-once"] and dummy.lease is None
    assert not a.knows(dummy) and index.leases.get(dummy.pbx_id) is None
    records = [r for r in caplog.records if r.name == "callvault.archive"]
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    said = [r.getMessage() for r in records if "dummy" in r.getMessage()]
    assert said == ["PBX dummy was taken off the registry: node vm stops working on it"]


async def test_a_round_that_cannot_take_a_pbx_still_renews_the_others(
    index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking a free PBX fails (the index refuses the statement): the leases held were
    renewed first, and the round ends without failing the loop."""
    ids = [register_pbx(index, f"p{i}").id for i in range(3)]
    clock = Clock()
    a = node(index, "a", ids[:2], clock)
    await a.register()
    await a.tick()
    assert held(a) == set(ids[:2])

    def refused(*args: Any, **kwargs: Any) -> list[Lease]:
        raise RuntimeError("the index refused the statement")

    monkeypatch.setattr(index.leases, "acquire_many", refused)
    a.add_lane(FakeLane(ids[2], "p2"))
    for _ in range(4):  # longer than a lease
        clock.advance(RENEW_S)
        await a.tick()
        assert held(a) == set(ids[:2])
        for pbx_id in ids[:2]:
            lease = index.leases.get(pbx_id)
            assert lease is not None and lease.expires_at == clock.now + timedelta(seconds=TTL_S)
    await a.close()
