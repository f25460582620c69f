"""Leases of PBXs to nodes (`index.leases`), on SQLite and PostgreSQL: one holder at a
time, taken over only once expired, a restart of the holder takes it back, and a holder
whose token is stale can neither renew nor release (fencing)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from callvault.index import Index
from support.index_data import register_pbx

NOW = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
TTL = timedelta(seconds=15)


def test_a_free_pbx_goes_to_the_first_node_and_no_other(index: Index) -> None:
    pbx = register_pbx(index, "paris")
    lease = index.leases.acquire(pbx.id, node="a", now=NOW, ttl=TTL)
    assert lease is not None
    assert (lease.node, lease.token, lease.expires_at) == ("a", 1, NOW + TTL)
    assert lease.held(NOW) and not lease.held(NOW + TTL)
    assert index.leases.acquire(pbx.id, node="b", now=NOW + TTL / 2, ttl=TTL) is None
    assert index.leases.get(pbx.id) == lease


def test_renewal_keeps_it_and_expiry_lets_another_node_take_it(index: Index) -> None:
    pbx = register_pbx(index, "paris")
    a = index.leases.acquire(pbx.id, node="a", now=NOW, ttl=TTL)
    assert a is not None
    later = NOW + timedelta(seconds=10)
    assert index.leases.renew(pbx.id, node="a", token=a.token, now=later, ttl=TTL) == later + TTL
    # Past the first expiry, but renewed: still a's.
    past_first = NOW + TTL + timedelta(seconds=1)
    assert index.leases.acquire(pbx.id, node="b", now=past_first, ttl=TTL) is None
    b = index.leases.acquire(pbx.id, node="b", now=later + TTL, ttl=TTL)
    assert b is not None and (b.node, b.token) == ("b", 2)


def test_a_paused_holder_cannot_renew_or_release_what_it_lost(index: Index) -> None:
    pbx = register_pbx(index, "paris")
    a = index.leases.acquire(pbx.id, node="a", now=NOW, ttl=TTL)
    assert a is not None
    b = index.leases.acquire(pbx.id, node="b", now=NOW + 2 * TTL, ttl=TTL)
    assert b is not None
    # a wakes up: its token is stale, whatever its clock says.
    assert index.leases.renew(pbx.id, node="a", token=a.token, now=NOW + TTL, ttl=TTL) is None
    assert not index.leases.release(pbx.id, node="a", token=a.token)
    assert index.leases.get(pbx.id) == b
    # An expired lease nobody took is renewed by its holder.
    late = NOW + 4 * TTL
    assert index.leases.renew(pbx.id, node="b", token=b.token, now=late, ttl=TTL) == late + TTL


def test_a_restart_of_the_holder_takes_it_back_at_once_with_a_new_token(index: Index) -> None:
    pbx = register_pbx(index, "paris")
    old = index.leases.acquire(pbx.id, node="a", now=NOW, ttl=TTL)
    new = index.leases.acquire(pbx.id, node="a", now=NOW + timedelta(seconds=1), ttl=TTL)
    assert old is not None and new is not None and new.token == old.token + 1
    assert index.leases.renew(pbx.id, node="a", token=old.token, now=NOW, ttl=TTL) is None


def test_a_released_pbx_is_free_at_once(index: Index) -> None:
    pbx = register_pbx(index, "paris")
    a = index.leases.acquire(pbx.id, node="a", now=NOW, ttl=TTL)
    assert a is not None
    assert index.leases.release(pbx.id, node="a", token=a.token)
    released = index.leases.get(pbx.id)
    assert released is not None and released.node is None and not released.held(NOW)
    b = index.leases.acquire(pbx.id, node="b", now=NOW, ttl=TTL)
    assert b is not None and b.token == 2
    assert [lease.pbx_id for lease in index.leases.all()] == [pbx.id]


def test_removing_a_pbx_removes_its_lease(index: Index) -> None:
    pbx = register_pbx(index, "paris")
    assert index.leases.acquire(pbx.id, node="a", now=NOW, ttl=TTL) is not None
    index.pbxs.remove("paris")
    assert index.leases.all() == []


def test_racing_nodes_never_both_win(index: Index) -> None:
    pbxs = [register_pbx(index, f"p{i}") for i in range(4)]
    won: dict[str, list[int]] = {f"n{i}": [] for i in range(4)}
    start = threading.Barrier(len(won))

    def race(node: str) -> None:
        start.wait()
        for pbx in pbxs:
            if index.leases.acquire(pbx.id, node=node, now=NOW, ttl=TTL) is not None:
                won[node].append(pbx.id)

    threads = [threading.Thread(target=race, args=(node,)) for node in won]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = sorted(pbx_id for ids in won.values() for pbx_id in ids)
    assert winners == sorted(pbx.id for pbx in pbxs)
    assert {lease.token for lease in index.leases.all()} == {1}


def test_a_lease_of_a_node_known_dead_is_taken_at_once(index: Index) -> None:
    pbx = register_pbx(index, "paris")
    assert index.leases.acquire(pbx.id, node="a", now=NOW, ttl=TTL) is not None
    assert index.leases.acquire(pbx.id, node="b", now=NOW, ttl=TTL, dead=["c"]) is None
    b = index.leases.acquire(pbx.id, node="b", now=NOW, ttl=TTL, dead=["a"])
    assert b is not None and (b.node, b.token) == ("b", 2)


def test_many_leases_are_renewed_in_one_go_and_only_those_still_held(index: Index) -> None:
    pbxs = [register_pbx(index, f"p{i}") for i in range(3)]
    leases = [index.leases.acquire(pbx.id, node="a", now=NOW, ttl=TTL) for pbx in pbxs]
    assert all(lease is not None for lease in leases)
    tokens = {lease.pbx_id: lease.token for lease in leases if lease is not None}
    lost = pbxs[1].id
    later = NOW + 2 * TTL
    assert index.leases.acquire(lost, node="b", now=later, ttl=TTL) is not None
    renewed = index.leases.renew_many(tokens, node="a", now=later, ttl=TTL)
    assert renewed == set(tokens) - {lost}
    for pbx_id in renewed:
        lease = index.leases.get(pbx_id)
        assert lease is not None and lease.expires_at == later + TTL
    assert index.leases.renew_many({}, node="a", now=later, ttl=TTL) == set()


def test_several_are_taken_in_one_statement_but_never_a_live_holders(index: Index) -> None:
    free, live, dead, own = (register_pbx(index, name).id for name in ("a1", "a2", "a3", "a4"))
    for pbx_id, node in ((live, "b"), (dead, "c"), (own, "a")):
        assert index.leases.acquire(pbx_id, node=node, now=NOW, ttl=TTL) is not None
    later = NOW + TTL / 2  # every lease still held
    won = index.leases.acquire_many(
        [free, live, dead, own], node="a", now=later, ttl=TTL, dead=["c"]
    )
    assert [(lease.pbx_id, lease.node) for lease in won] == [
        (free, "a"),
        (dead, "a"),
        (own, "a"),
    ]
    assert [lease.token for lease in won] == [1, 2, 2]  # a new token for each
    held_by_b = index.leases.get(live)
    assert held_by_b is not None and held_by_b.node == "b" and held_by_b.token == 1
    assert index.leases.acquire_many([], node="a", now=later, ttl=TTL) == []


def test_a_pbx_taken_off_the_registry_is_not_taken_and_fails_none_of_the_others(
    index: Index,
) -> None:
    kept, gone = register_pbx(index, "paris"), register_pbx(index, "lyon")
    assert index.leases.acquire(gone.id, node="a", now=NOW, ttl=TTL) is not None
    index.pbxs.remove("lyon")  # its lease row goes with it
    won = index.leases.acquire_many([gone.id, kept.id], node="a", now=NOW, ttl=TTL)
    assert [(lease.pbx_id, lease.node) for lease in won] == [(kept.id, "a")]
    assert [lease.pbx_id for lease in index.leases.all()] == [kept.id]
    assert index.leases.removed([kept.id, gone.id]) == {gone.id}
    assert index.leases.removed([]) == set()
