"""The retry decisions: not-found schedule, missing bound, transient backoff and give-up."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from callvault.archive import RetryPolicy, after_not_found, after_transient
from callvault.archive._backfill import windows
from callvault.archive._policy import transient_delay

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy()


def test_not_found_right_after_hangup_retries_on_the_schedule() -> None:
    delays = []
    for attempt in range(1, 8):
        decision = after_not_found(
            POLICY,
            error="errno 20014",
            attempts=attempt,
            missing_since=NOW,
            call_ended_at=NOW - timedelta(seconds=3),
            now=NOW,
        )
        assert decision.action == "retry"
        assert decision.next_attempt_at is not None
        delays.append((decision.next_attempt_at - NOW).total_seconds())
    assert delays == [2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0]
    # The last value repeats.
    later = after_not_found(
        POLICY, error="x", attempts=30, missing_since=NOW, call_ended_at=None, now=NOW
    )
    assert later.next_attempt_at == NOW + timedelta(seconds=300)


def test_recent_call_becomes_missing_only_after_time_and_attempts() -> None:
    since = NOW - timedelta(minutes=31)
    # Long enough, but too few answers: keep trying.
    few = after_not_found(
        POLICY,
        error="errno 20014",
        attempts=7,
        missing_since=since,
        call_ended_at=since,
        now=NOW,
    )
    assert few.action == "retry"
    # Enough answers, but not long enough: keep trying.
    young = after_not_found(
        POLICY,
        error="errno 20014",
        attempts=20,
        missing_since=NOW - timedelta(minutes=10),
        call_ended_at=NOW - timedelta(minutes=10),
        now=NOW,
    )
    assert young.action == "retry"
    both = after_not_found(
        POLICY, error="errno 20014", attempts=8, missing_since=since, call_ended_at=since, now=NOW
    )
    assert both.action == "missing"
    assert "errno 20014" in both.reason and "8 attempts" in both.reason and "31 min" in both.reason


def test_old_call_is_missing_after_a_few_answers() -> None:
    ended = NOW - timedelta(days=3)
    first = after_not_found(
        POLICY, error="errno 20014", attempts=1, missing_since=None, call_ended_at=ended, now=NOW
    )
    assert first.action == "retry"
    third = after_not_found(
        POLICY,
        error="errno 20014",
        attempts=3,
        missing_since=NOW - timedelta(seconds=7),
        call_ended_at=ended,
        now=NOW,
    )
    assert third.action == "missing"


def test_transient_backoff_grows_is_capped_and_gives_up() -> None:
    policy = RetryPolicy(transient_base_s=5, transient_max_s=60, jitter=0, transient_max_attempts=6)
    delays = [transient_delay(policy, n) for n in range(1, 7)]
    assert delays == [5, 10, 20, 40, 60, 60]
    retry = after_transient(policy, error="connection reset", attempts=5, now=NOW)
    assert retry.action == "retry" and retry.reason == "connection reset"
    assert retry.next_attempt_at == NOW + timedelta(seconds=60)
    final = after_transient(policy, error="connection reset", attempts=6, now=NOW)
    assert final.action == "failed"
    assert "connection reset" in final.reason and "6 attempts" in final.reason


@given(attempts=st.integers(min_value=1, max_value=200), seed=st.integers(0, 2**32))
def test_jittered_delay_stays_within_bounds(attempts: int, seed: int) -> None:
    policy = RetryPolicy(transient_base_s=2, transient_max_s=300, jitter=0.25)
    delay = transient_delay(policy, attempts, random.Random(seed))
    nominal = min(300, 2 * 2 ** min(attempts - 1, 30))
    assert 0.75 * nominal - 1e-9 <= delay <= min(300, 1.25 * nominal) + 1e-9


@given(
    start=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    minutes=st.integers(min_value=1, max_value=60 * 24 * 20),
)
def test_windows_cover_the_range_in_pieces_of_at_most_a_day(start: datetime, minutes: int) -> None:
    start = start.replace(tzinfo=UTC)
    end = start + timedelta(minutes=minutes)
    parts = list(windows(start, end))
    assert parts[0][0] == start and parts[-1][1] == end
    for (_a, b), (c, _d) in itertools.pairwise(parts):
        assert b == c
    assert all(timedelta(0) < b - a <= timedelta(days=1) for a, b in parts)
