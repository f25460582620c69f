"""When to try a recording again, and when to stop: pure functions, no I/O.

Failures are told apart by their `callvault.pbx.ErrorKind` (the workers classify every
exception with `callvault.pbx.error_kind`):

* "does not exist" (errno 20014, or 20012 which 2017 firmware uses for a missing file)
  is normal right after hang-up, while the PBX is still writing the file. It is retried
  on a fixed, growing schedule; after a long enough run of such answers the recording
  is declared ``missing`` with the reason.
* transient faults (connection dropped, 5xx, timeouts, a body that is not audio...) are
  retried with exponential backoff and jitter; after a bounded number of attempts the
  recording is ``failed`` with the reason, and reconciliation queues it again later.
* permanent faults (a name that cannot be a file name, a request the API rejects, input no
  attempt can fix) fail the recording at once with the reason (`after_permanent`).

Nothing gives up silently: every outcome carries the error text that led to it. No decision
can raise, whatever the times and knobs it is given: delays are bounded (`MAX_DELAY`) and a
time past the calendar's end is capped, so a job with absurd times (a PBX clock at year
9999) still gets a decision.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

# The longest delay any decision sets, whatever the policy says (a year).
MAX_DELAY = timedelta(days=366)
_LATEST = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The knobs of the retry decisions (seconds unless said otherwise)."""

    # Delay before the n-th retry of a "does not exist" answer; the last value repeats.
    not_found_schedule_s: Sequence[float] = field(
        default_factory=lambda: (2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
    )
    # A recent call's recording is missing once the PBX has said "does not exist" for
    # this long AND at least `missing_min_attempts` times.
    missing_after_s: float = 1800.0
    missing_min_attempts: int = 8
    # A recording whose call ended, AND which the index learned of, longer than
    # `missing_after_s` before the first "does not exist" cannot be "not written yet": a few
    # answers suffice.
    old_call_min_attempts: int = 3
    transient_base_s: float = 5.0
    transient_max_s: float = 900.0
    transient_max_attempts: int = 12
    # Random part of a transient delay, as a fraction of it (spreads a burst of retries).
    jitter: float = 0.25


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a job after a failed attempt."""

    action: str  # "retry" | "missing" | "failed"
    reason: str
    next_attempt_at: datetime | None = None


RETRY = "retry"
GIVE_UP_MISSING = "missing"
GIVE_UP_FAILED = "failed"


def after_not_found(
    policy: RetryPolicy,
    *,
    error: str,
    attempts: int,
    missing_since: datetime | None,
    call_ended_at: datetime | None,
    now: datetime,
    queued_at: datetime | None = None,
) -> Decision:
    """Decide after the PBX said the recording does not exist.

    `attempts` counts this attempt; `missing_since` is when the current run of "does not
    exist" answers began (None if this is its first); `call_ended_at` when the call ended
    (None if unknown); `queued_at` when the index learned of the recording (None if
    unknown).

    The call's age is judged from the later of the two: the call end comes from the PBX's
    local clock read in the configured zone, which may be wrong or skewed, while a
    recording just queued by this machine's clock is never old: it gets the whole
    not-ready window.
    """
    since = missing_since or now
    known = [moment for moment in (call_ended_at, queued_at) if moment is not None]
    age_from = max(known) if known else None
    # (Differences of datetimes never overflow: a timedelta spans the whole calendar.)
    old_call = age_from is not None and (since - age_from).total_seconds() >= policy.missing_after_s
    long_run = (now - since).total_seconds() >= policy.missing_after_s
    if (old_call and attempts >= policy.old_call_min_attempts) or (
        long_run and attempts >= policy.missing_min_attempts
    ):
        minutes = max(0, round((now - since).total_seconds() / 60))
        return Decision(
            GIVE_UP_MISSING,
            f"the PBX says the recording does not exist ({error}); "
            f"{attempts} attempts over {minutes} min",
        )
    schedule = policy.not_found_schedule_s or (60.0,)
    delay = schedule[min(max(attempts, 1), len(schedule)) - 1]
    return Decision(RETRY, error, later(now, delay))


def after_transient(
    policy: RetryPolicy,
    *,
    error: str,
    attempts: int,
    now: datetime,
    rng: random.Random | None = None,
) -> Decision:
    """Decide after a fault that may go away (network, 5xx, bad body, disk...)."""
    if attempts >= policy.transient_max_attempts:
        return Decision(GIVE_UP_FAILED, f"{error} (gave up after {attempts} attempts)")
    return Decision(RETRY, error, later(now, transient_delay(policy, attempts, rng)))


def after_permanent(*, error: str) -> Decision:
    """Decide after a fault no later attempt can fix (an unsafe name, a rejected request):
    `failed` at once with the reason."""
    return Decision(GIVE_UP_FAILED, error)


def later(now: datetime, seconds: float) -> datetime:
    """`now` plus `seconds`, which are taken as 0 to `MAX_DELAY` (NaN as 0), and capped at
    the calendar's end: never raises."""
    if not seconds > 0:  # also NaN
        return now
    delay = timedelta(seconds=min(seconds, MAX_DELAY.total_seconds()))
    try:
        return now + delay
    except OverflowError:
        return _LATEST


def transient_delay(policy: RetryPolicy, attempts: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: base * 2**(attempts-1), capped, +- jitter."""
    exponent = min(max(attempts, 1) - 1, 30)
    delay = min(policy.transient_max_s, policy.transient_base_s * (2**exponent))
    spread = delay * policy.jitter
    draw = (rng or random).uniform(-spread, spread) if math.isfinite(spread) else 0.0
    return float(max(0.0, min(policy.transient_max_s, delay + draw)))
