"""Job claims: leases, finishing only by the claimant, retries, give-ups, requeue, races."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from callvault.index import Index, open_index
from callvault.index.schema import ARCHIVED, DOWNLOADING, FAILED, MISSING, PENDING
from callvault.pbx._types import CallDetail

UTC_ZONE = ZoneInfo("UTC")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'callvault.db'}"


@pytest.fixture
def index(url: str) -> Iterator[Index]:
    idx = open_index(url)
    yield idx
    idx.close()


def queue(index: Index, count: int, now: datetime = NOW, start: int = 0) -> list[int]:
    results = index.record_calls(
        [
            CallDetail(
                callid=f"17000.{i}",
                timestart="2024-05-01 11:59:00",
                recording=f"20240501115900-17000.{i}-1001-1002-Internal.wav",
                sn="SN9",
            )
            for i in range(start, start + count)
        ],
        source="event",
        tz=UTC_ZONE,
        now=now,
    )
    return [r.recording_id for r in results if r.recording_id is not None]


def archive(index: Index, recording_id: int, worker: str, now: datetime = NOW) -> bool:
    return index.mark_archived(
        recording_id,
        worker_id=worker,
        size=1234,
        sha256="b" * 64,
        storage_key=f"SN9/2024/05/01/{recording_id}.wav",
        content_type="audio/wav",
        now=now,
    )


def test_claim_takes_due_jobs_oldest_first_and_once(index: Index) -> None:
    first = queue(index, 2, NOW)
    later = queue(index, 1, NOW + timedelta(minutes=1), start=10)
    jobs = index.claim_jobs("w1", 10, now=NOW, lease=LEASE)
    assert [j.recording_id for j in jobs] == first
    job = jobs[0]
    assert job.attempts == 1 and job.callid == "17000.0" and job.pbx_serial == "SN9"
    assert job.start_at == datetime(2024, 5, 1, 11, 59, tzinfo=UTC)
    assert job.name == "20240501115900-17000.0-1001-1002-Internal.wav"
    assert index.claim_jobs("w2", 10, now=NOW, lease=LEASE) == []
    jobs = index.claim_jobs("w2", 10, now=NOW + timedelta(minutes=1), lease=LEASE)
    assert [j.recording_id for j in jobs] == later
    row = index.recording_by_id(first[0])
    assert row is not None
    assert (row.state, row.claimed_by, row.claimed_until) == (DOWNLOADING, "w1", NOW + LEASE)


def test_limit_is_respected(index: Index) -> None:
    queue(index, 5)
    assert len(index.claim_jobs("w1", 2, now=NOW, lease=LEASE)) == 2
    assert len(index.claim_jobs("w1", 0, now=NOW, lease=LEASE)) == 0
    assert len(index.claim_jobs("w2", 10, now=NOW, lease=LEASE)) == 3


def test_expired_lease_makes_job_claimable_and_old_worker_loses_it(index: Index) -> None:
    [rid] = queue(index, 1)
    [job] = index.claim_jobs("crashed", 1, now=NOW, lease=LEASE)
    assert index.claim_jobs("w2", 1, now=NOW + LEASE - timedelta(seconds=1), lease=LEASE) == []
    [again] = index.claim_jobs("w2", 1, now=NOW + LEASE, lease=LEASE)
    assert again.recording_id == rid and again.attempts == 2
    assert not archive(index, rid, "crashed")
    assert archive(index, rid, "w2", NOW + LEASE)
    row = index.recording_by_id(rid)
    assert row is not None
    assert (row.state, row.claimed_by, row.size, row.sha256) == (ARCHIVED, None, 1234, "b" * 64)
    assert row.archived_at == NOW + LEASE
    assert index.claim_jobs("w3", 1, now=NOW + timedelta(days=1), lease=LEASE) == []
    assert job.recording_id == rid


def test_retry_backs_off_and_tracks_missing_since(index: Index) -> None:
    [rid] = queue(index, 1)
    index.claim_jobs("w1", 1, now=NOW, lease=LEASE)
    retry_at = NOW + timedelta(seconds=20)
    assert index.mark_retry(
        rid,
        worker_id="w1",
        error="20014 not found",
        next_attempt_at=retry_at,
        now=NOW,
        not_found=True,
    )
    row = index.recording_by_id(rid)
    assert row is not None
    assert (row.state, row.missing_since, row.last_error) == (PENDING, NOW, "20014 not found")
    assert index.claim_jobs("w1", 1, now=retry_at - timedelta(seconds=1), lease=LEASE) == []
    [job] = index.claim_jobs("w1", 1, now=retry_at, lease=LEASE)
    assert job.missing_since == NOW and job.attempts == 2
    index.mark_retry(
        rid, worker_id="w1", error="again", next_attempt_at=retry_at, now=retry_at, not_found=True
    )
    assert index.recording_by_id(rid).missing_since == NOW  # type: ignore[union-attr]
    index.claim_jobs("w1", 1, now=retry_at, lease=LEASE)
    index.mark_retry(
        rid,
        worker_id="w1",
        error="timeout",
        next_attempt_at=retry_at,
        now=retry_at,
        not_found=False,
    )
    assert index.recording_by_id(rid).missing_since is None  # type: ignore[union-attr]
    assert index.next_due() == retry_at
    assert [r.id for r in index.retrying()] == [rid]


def test_give_up_and_requeue(index: Index) -> None:
    gone, broken = queue(index, 2)
    index.claim_jobs("w1", 2, now=NOW, lease=LEASE)
    assert not index.mark_missing(gone, worker_id="other", reason="x", now=NOW)
    assert index.mark_missing(gone, worker_id="w1", reason="not on the PBX for 2h", now=NOW)
    assert index.mark_failed(broken, worker_id="w1", reason="5 timeouts", now=NOW)
    assert index.counts_by_state() == {
        PENDING: 0,
        DOWNLOADING: 0,
        ARCHIVED: 0,
        FAILED: 1,
        MISSING: 1,
    }
    failures = index.recent_failures(10)
    assert {(f.name.split("-")[1], f.state, f.last_error) for f in failures} == {
        ("17000.0", MISSING, "not on the PBX for 2h"),
        ("17000.1", FAILED, "5 timeouts"),
    }
    with pytest.raises(ValueError):
        index.requeue([ARCHIVED], now=NOW)
    later = NOW + timedelta(hours=1)
    assert index.requeue([FAILED], now=later) == 1
    [job] = index.claim_jobs("w2", 5, now=later, lease=LEASE)
    assert job.recording_id == broken and job.attempts == 1


def test_two_indexes_in_two_threads_never_share_a_job(url: str) -> None:
    setup = open_index(url)
    ids = set(queue(setup, 200))
    setup.close()
    indexes = [open_index(url), open_index(url)]
    claimed: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    # Both threads hold a first batch before either goes on, so the two really interleave
    # (otherwise one thread can, by scheduling alone, claim all 200 before the other starts).
    first_round = threading.Barrier(2)

    def work(n: int) -> None:
        try:
            barrier.wait()
            rounds = 0
            while True:
                jobs = indexes[n].claim_jobs(f"w{n}", 3, now=NOW, lease=LEASE)
                rounds += 1
                if rounds == 1:
                    first_round.wait(timeout=30)
                if not jobs:
                    return
                for job in jobs:
                    claimed[n].append(job.recording_id)
                    assert archive(indexes[n], job.recording_id, f"w{n}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for idx in indexes:
        idx.close()
    assert errors == []
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)
    assert claimed[0] and claimed[1]
    check = open_index(url)
    assert check.counts_by_state()[ARCHIVED] == 200
    check.close()
