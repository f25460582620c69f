"""SessionGate on its own: shared holders together, exclusive alone, first come first served
(so an exclusive waiter is never starved by shared ones), and cancellation at every point
leaves the gate neither held nor blocked."""

from __future__ import annotations

import asyncio

import pytest

from callvault.pbx._gate import SessionGate


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(10):
        await asyncio.sleep(0)


class Holder:
    """A task that takes the gate, notes when, and holds it until told to let go."""

    def __init__(self, gate: SessionGate, kind: str, log: list[str], name: str) -> None:
        self.release = asyncio.Event()
        self.inside = asyncio.Event()
        self.name = name

        async def run() -> None:
            hold = gate.shared() if kind == "shared" else gate.exclusive()
            async with hold:
                log.append(f"{name}+")
                self.inside.set()
                await self.release.wait()
                log.append(f"{name}-")

        self.task = asyncio.create_task(run(), name=name)

    async def leave(self) -> None:
        self.release.set()
        await self.task


async def test_many_shared_holders_at_once() -> None:
    gate = SessionGate()
    log: list[str] = []
    holders = [Holder(gate, "shared", log, f"r{i}") for i in range(5)]
    await settle()
    assert gate.shared_holders == 5
    assert sorted(log) == [f"r{i}+" for i in range(5)]
    for holder in holders:
        await holder.leave()
    assert gate.shared_holders == 0 and not gate.exclusive_held and gate.waiting == 0


async def test_exclusive_waits_for_shared_and_keeps_newcomers_out() -> None:
    gate = SessionGate()
    log: list[str] = []
    r1 = Holder(gate, "shared", log, "r1")
    r2 = Holder(gate, "shared", log, "r2")
    await settle()
    w = Holder(gate, "exclusive", log, "w")
    await settle()
    r3 = Holder(gate, "shared", log, "r3")  # arrives while the writer waits
    await settle()
    assert log == ["r1+", "r2+"]
    assert gate.waiting == 2
    await r1.leave()
    await settle()
    assert "w+" not in log  # r2 still holds
    await r2.leave()
    await w.inside.wait()
    await settle()
    assert "r3+" not in log  # the writer holds it alone
    assert gate.exclusive_held and gate.shared_holders == 0
    await w.leave()
    await r3.inside.wait()
    await r3.leave()
    assert log == ["r1+", "r2+", "r1-", "r2-", "w+", "w-", "r3+", "r3-"]


async def test_writer_is_not_starved_by_a_stream_of_readers() -> None:
    """Readers keep arriving, each before the last has left: without writer preference the
    gate would never be free. The writer gets in after the readers that held it on arrival."""
    gate = SessionGate()
    log: list[str] = []
    current = Holder(gate, "shared", log, "r0")
    await current.inside.wait()
    writer: Holder | None = None
    for n in range(1, 40):
        newcomer = Holder(gate, "shared", log, f"r{n}")
        await settle()
        await current.leave()
        current = newcomer
        if n == 5:
            writer = Holder(gate, "exclusive", log, "w")
            await settle()
        if writer is not None and writer.inside.is_set():
            break
    assert writer is not None
    assert writer.inside.is_set(), log
    # In at the first moment nobody held it: after r5, the last reader in before it queued.
    assert log.index("w+") == log.index("r5-") + 1
    assert "r6+" not in log  # r6 arrived after the writer: it waits
    await writer.leave()
    await current.inside.wait()
    await current.leave()
    assert log[-3:] == ["w-", "r6+", "r6-"]
    assert gate.shared_holders == 0 and gate.waiting == 0


async def test_exclusive_holders_never_overlap_and_queue_in_order() -> None:
    gate = SessionGate()
    log: list[str] = []
    w1 = Holder(gate, "exclusive", log, "w1")
    await settle()
    r1 = Holder(gate, "shared", log, "r1")
    w2 = Holder(gate, "exclusive", log, "w2")
    r2 = Holder(gate, "shared", log, "r2")
    r3 = Holder(gate, "shared", log, "r3")
    await settle()
    assert log == ["w1+"]
    await w1.leave()
    await r1.inside.wait()
    await settle()
    assert log == ["w1+", "w1-", "r1+"]  # w2 queued before r2/r3: they wait
    await r1.leave()
    await w2.inside.wait()
    await settle()
    assert "r2+" not in log
    await w2.leave()
    await settle()
    assert r2.inside.is_set() and r3.inside.is_set()  # a run of readers gets in together
    assert gate.shared_holders == 2
    await r2.leave()
    await r3.leave()
    assert gate.shared_holders == 0 and gate.waiting == 0


async def test_cancelled_shared_waiter_leaves_the_queue() -> None:
    gate = SessionGate()
    log: list[str] = []
    w = Holder(gate, "exclusive", log, "w")
    await settle()
    r = Holder(gate, "shared", log, "r")
    await settle()
    assert gate.waiting == 1
    r.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await r.task
    assert gate.waiting == 0
    await w.leave()
    assert gate.shared_holders == 0 and not gate.exclusive_held
    later = Holder(gate, "exclusive", log, "later")
    await later.inside.wait()
    await later.leave()
    assert log == ["w+", "w-", "later+", "later-"]


async def test_cancelled_writer_does_not_leave_readers_behind_it_stuck() -> None:
    gate = SessionGate()
    log: list[str] = []
    r1 = Holder(gate, "shared", log, "r1")
    await settle()
    w = Holder(gate, "exclusive", log, "w")
    await settle()
    r2 = Holder(gate, "shared", log, "r2")
    await settle()
    assert log == ["r1+"]  # r2 waits behind the writer
    w.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w.task
    await asyncio.wait_for(r2.inside.wait(), 1)  # admitted at once, while r1 still holds
    assert gate.shared_holders == 2
    await r1.leave()
    await r2.leave()
    assert log == ["r1+", "r2+", "r1-", "r2-"]
    assert gate.shared_holders == 0 and gate.waiting == 0


async def test_cancelled_after_being_granted_gives_the_gate_back() -> None:
    """Granted and cancelled in the same loop turn, before the waiter ran again."""
    gate = SessionGate()
    log: list[str] = []
    w = Holder(gate, "exclusive", log, "w")
    await settle()
    r = Holder(gate, "shared", log, "r")
    w2 = Holder(gate, "exclusive", log, "w2")
    await settle()
    w.release.set()
    while gate.shared_holders == 0:  # w has left and granted the gate to r ...
        await asyncio.sleep(0)
    assert not r.inside.is_set()
    r.task.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await r.task
    assert "r+" not in log
    await asyncio.wait_for(w2.inside.wait(), 1)
    await w2.leave()
    assert gate.shared_holders == 0 and not gate.exclusive_held and gate.waiting == 0


async def test_cancelled_holder_releases() -> None:
    gate = SessionGate()
    log: list[str] = []
    r = Holder(gate, "shared", log, "r")
    w = Holder(gate, "exclusive", log, "w")
    await r.inside.wait()
    r.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await r.task
    await asyncio.wait_for(w.inside.wait(), 1)
    await w.leave()
    assert gate.shared_holders == 0 and not gate.exclusive_held


async def test_timeout_around_a_waiter() -> None:
    gate = SessionGate()
    async with gate.exclusive():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                async with gate.shared():
                    pytest.fail("entered while held exclusive")
        assert gate.waiting == 0
    async with gate.shared():
        assert gate.shared_holders == 1


async def test_error_inside_releases_and_unbalanced_release_is_refused() -> None:
    gate = SessionGate()
    with pytest.raises(KeyError):
        async with gate.exclusive():
            raise KeyError("boom")
    assert not gate.exclusive_held
    with pytest.raises(RuntimeError, match="without a holder"):
        await gate.shared().__aexit__(None, None, None)
    with pytest.raises(RuntimeError, match="without a holder"):
        await gate.exclusive().__aexit__(None, None, None)
    assert "shared_holders=0" in repr(gate)


async def test_waiter_cancelled_in_the_same_turn_as_a_release_is_skipped() -> None:
    """The release runs before the cancelled waiter's clean-up: the waiter is dropped, not
    granted, and the gate ends free."""
    gate = SessionGate()
    hold = gate.exclusive()
    await hold.__aenter__()
    entered: list[str] = []

    async def reader() -> None:
        async with gate.shared():
            entered.append("r")

    task = asyncio.create_task(reader())
    await settle()
    assert gate.waiting == 1
    task.cancel()
    await hold.__aexit__(None, None, None)
    assert gate.waiting == 0 and gate.shared_holders == 0 and not gate.exclusive_held
    with pytest.raises(asyncio.CancelledError):
        await task
    assert entered == []
    assert gate.waiting == 0 and gate.shared_holders == 0
    async with gate.exclusive():
        assert gate.exclusive_held
