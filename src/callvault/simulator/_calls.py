"""The random calls both simulators place (`place_random_call`): one draw, two APIs.

A plausible mix: internal calls between extensions 1000 to 1020, inbound calls from a
mobile number, outbound calls to one; four in five answered (so recorded). Each simulator
draws from its own seeded generator, under its own lock, and turns the draw into a call of
its API.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STATUSES = (
    ("ANSWERED", 16),
    ("NO ANSWER", 1),
    ("BUSY", 1),
    ("FAILED", 1),
    ("VOICEMAIL", 1),
)
"""The statuses of random calls and their weights."""


@dataclass(frozen=True, slots=True)
class RandomCall:
    """One drawn call: its type, who called whom, its status and durations."""

    call_type: str  # Internal, Inbound or Outbound
    extension: str  # the PBX's side
    other: str  # the other extension of an internal call
    mobile: str  # the outside number of an inbound or outbound call, as drawn
    status: str
    talk_seconds: int
    ring_seconds: int

    def parties(self, mobile: str | None = None) -> tuple[str, str]:
        """(caller, callee), with `mobile` as the outside number if given (e.g. as the PBX
        shows it dialled)."""
        outside = self.mobile if mobile is None else mobile
        if self.call_type == "Internal":
            return self.extension, self.other
        if self.call_type == "Inbound":
            return outside, self.extension
        return self.extension, outside


def draw_call(rng: random.Random, *, answered: bool | None = None) -> RandomCall:
    """Draw a call from `rng` (the caller holds whatever lock guards it). `answered` True
    forces an answered call, False an unanswered one."""
    call_type = rng.choices(["Internal", "Inbound", "Outbound"], weights=[3, 4, 3])[0]
    extension = str(rng.randint(1000, 1020))
    mobile = f"0151{rng.randint(10_000_000, 99_999_999)}"
    status = rng.choices([s for s, _w in STATUSES], weights=[w for _s, w in STATUSES])[0]
    talk = rng.randint(2, 40)
    ring = rng.randint(1, 15)
    other = str(rng.randint(1000, 1020))
    if answered is not None:
        status = "ANSWERED" if answered else "NO ANSWER"
    return RandomCall(call_type, extension, other, mobile, status, talk, ring)
