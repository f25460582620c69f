"""The retry decisions: not-found schedule, missing bound, transient backoff and give-up,
permanent failures at once; and no decision raises, whatever times and knobs it gets."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from callvault.archive import RetryPolicy, after_not_found, after_permanent, after_transient
from callvault.archive._policy import MAX_DELAY, transient_delay

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


def test_a_call_that_looks_old_but_was_just_queued_is_not_missing_after_a_few_answers() -> None:
    # The PBX's time read in the wrong zone: the call seems to have ended 8 hours ago.
    seems_ended = NOW - timedelta(hours=8)
    args: dict[str, Any] = {
        "error": "errno 20014",
        "attempts": 3,
        "missing_since": NOW - timedelta(seconds=7),
        "call_ended_at": seems_ended,
        "now": NOW,
    }
    assert after_not_found(POLICY, **args).action == "missing"  # unknown queue time
    queued_now = after_not_found(POLICY, **args, queued_at=NOW - timedelta(seconds=8))
    assert queued_now.action == "retry"
    queued_long_ago = after_not_found(POLICY, **args, queued_at=NOW - timedelta(days=2))
    assert queued_long_ago.action == "missing"
    # Unknown call end, just queued: the whole window too.
    no_end = dict(args, call_ended_at=None, attempts=20)
    assert after_not_found(POLICY, **no_end, queued_at=NOW).action == "retry"


def test_a_permanent_failure_fails_at_once_with_the_reason() -> None:
    decision = after_permanent(error="recording name 'a/b.wav' contains a '/'")
    assert (decision.action, decision.next_attempt_at) == ("failed", None)
    assert decision.reason == "recording name 'a/b.wav' contains a '/'"


# Every aware datetime there is, from year 1 to 9999.
MOMENTS = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
SECONDS = st.one_of(
    st.floats(min_value=0, allow_nan=False, allow_infinity=True),
    st.just(float("nan")),
    st.integers(min_value=0, max_value=10**30).map(float),
)


@given(
    now=MOMENTS,
    since=st.none() | MOMENTS,
    ended=st.none() | MOMENTS,
    queued=st.none() | MOMENTS,
    attempts=st.integers(min_value=0, max_value=10**6),
    schedule=st.lists(SECONDS, max_size=4),
    missing_after=SECONDS,
)
def test_after_not_found_never_raises(
    now: datetime,
    since: datetime | None,
    ended: datetime | None,
    queued: datetime | None,
    attempts: int,
    schedule: list[float],
    missing_after: float,
) -> None:
    # A call at the calendar's end (a PBX clock at year 9999) used to overflow here, inside
    # the worker's error handler, and end the worker.
    policy = RetryPolicy(not_found_schedule_s=tuple(schedule), missing_after_s=missing_after)
    decision = after_not_found(
        policy,
        error="errno 20014",
        attempts=attempts,
        missing_since=since,
        call_ended_at=ended,
        queued_at=queued,
        now=now,
    )
    if decision.action == "retry":
        assert decision.next_attempt_at is not None
        assert timedelta(0) <= decision.next_attempt_at - now <= MAX_DELAY


@given(
    now=MOMENTS,
    attempts=st.integers(min_value=0, max_value=10**6),
    base=SECONDS,
    most=SECONDS,
    jitter=st.floats(min_value=0, max_value=1) | st.just(float("nan")),
    seed=st.integers(0, 2**32),
)
def test_after_transient_never_raises(
    now: datetime, attempts: int, base: float, most: float, jitter: float, seed: int
) -> None:
    policy = RetryPolicy(transient_base_s=base, transient_max_s=most, jitter=jitter)
    decision = after_transient(
        policy, error="reset", attempts=attempts, now=now, rng=random.Random(seed)
    )
    if decision.action == "retry":
        assert decision.next_attempt_at is not None
        assert timedelta(0) <= decision.next_attempt_at - now <= MAX_DELAY
