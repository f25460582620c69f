"""Data-subject requests (GDPR articles 15 and 17): find, export and erase everything
callvault holds of one phone number (`callvault subject ...` and the web app's admin).

A number matches a call's caller, callee or DID when their *significant digits* (the
number without spaces, ``+``, ``00`` or a leading ``0``) are equal, or, both having at
least 6, when one ends with the other: ``0612345678`` finds ``+33 6 12 34 56 78`` and the
other way round. An extension (fewer than 6 digits) matches only itself. Check what
`find` lists before erasing: a short number may match another country's.

The audit log records each request with the number's last four digits only, so that the
log does not keep what an erasure removed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from callvault.index import SubjectCall, audit
from callvault.index.retention import RetentionError
from callvault.ops._archive import Archive
from callvault.ops._json import JsonResult
from callvault.ops._recordings import pbx_names
from callvault.ops._retention import Refused, delete_now

MIN_SUFFIX_DIGITS = 6


def _significant(number: str) -> str:
    compact = re.sub(r"[\s().-]", "", number)
    if compact.startswith("+"):
        return compact[1:]
    if compact.startswith("00"):
        return compact[2:]
    if compact.startswith("0") and len(compact) > MIN_SUFFIX_DIGITS:
        return compact[1:]
    return compact


def significant_digits(number: str) -> str:
    """The digits that identify `number` (see the module docstring); RetentionError if it
    is not a phone number or an extension."""
    digits = _significant(number)
    if not re.fullmatch(r"\d{2,20}", digits):
        raise RetentionError(f"{number!r} is not a phone number or an extension")
    return digits


def _matches(stored: str, digits: str) -> bool:
    value = _significant(stored)
    if not value.isdigit():
        return False
    if min(len(value), len(digits)) < MIN_SUFFIX_DIGITS:
        return value == digits
    return value.endswith(digits) or digits.endswith(value)


def masked(number: str) -> str:
    """The number as the audit log keeps it: its last four digits."""
    digits = re.sub(r"\D", "", number)
    return "…" + digits[-4:] if len(digits) > 4 else "…"


@dataclass(frozen=True, slots=True)
class SubjectCallView(JsonResult):
    call_id: int
    pbx: str
    start_at: datetime | None
    call_from: str
    call_to: str
    did: str
    direction: str
    status: str
    recording_id: int | None
    recording_name: str | None
    recording_state: str | None
    holds: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SubjectFindings(JsonResult):
    number: str
    calls: list[SubjectCallView]

    @property
    def recording_ids(self) -> list[int]:
        return [c.recording_id for c in self.calls if c.recording_id is not None]

    @property
    def archived_ids(self) -> list[int]:
        return [
            c.recording_id
            for c in self.calls
            if c.recording_id is not None and c.recording_state == "archived"
        ]


def find_subject(
    archive: Archive, number: str, *, actor: str, now: datetime, remote_addr: str = ""
) -> SubjectFindings:
    """Every call (and its recording) of `number`; audited."""
    index = archive.index
    digits = significant_digits(number)
    calls = [
        call
        for call in index.calls.with_number_ending(digits[-MIN_SUFFIX_DIGITS:])
        if any(_matches(value, digits) for value in (call.call_from, call.call_to, call.did))
    ]
    findings = _view(archive, number, calls)
    index.audit.record(
        actor,
        audit.SUBJECT_REQUEST,
        masked(number),
        f"find: {len(findings.calls)} calls, {len(findings.recording_ids)} recordings",
        remote_addr,
        at=now,
    )
    return findings


def _view(archive: Archive, number: str, calls: Sequence[SubjectCall]) -> SubjectFindings:
    names = pbx_names(archive.index)
    ids = [c.recording_id for c in calls if c.recording_id is not None]
    holds = archive.index.retention.holds_on(ids)
    return SubjectFindings(
        number=number,
        calls=[
            SubjectCallView(
                call_id=c.call_id,
                pbx=names.get(c.pbx_id, str(c.pbx_id)),
                start_at=c.start_at,
                call_from=c.call_from,
                call_to=c.call_to,
                did=c.did,
                direction=c.direction,
                status=c.status,
                recording_id=c.recording_id,
                recording_name=c.recording_name,
                recording_state=c.recording_state,
                holds=[f"hold {h.id} ({h.case})" for h in holds.get(c.recording_id or -1, [])],
            )
            for c in calls
        ],
    )


@dataclass(frozen=True, slots=True)
class SubjectErasure(JsonResult):
    number: str
    deleted: list[int]  # recordings deleted
    kept: list[Refused]  # recordings kept (a hold, with its case), or not deletable
    calls_scrubbed: int  # calls whose numbers were blanked


def erase_subject(
    archive: Archive,
    findings: SubjectFindings,
    *,
    reason: str,
    actor: str,
    now: datetime,
    remote_addr: str = "",
) -> SubjectErasure:
    """Delete every recording `find_subject` found except the held ones (listed with
    their holds), and blank the numbers of their calls (and of calls without a
    recording); audited with the number's last digits only."""
    index = archive.index
    ids = findings.recording_ids
    report = delete_now(
        archive,
        ids,
        reason=reason,
        actor=actor,
        now=now,
        why="subject",
        remote_addr=remote_addr,
        states=("archived", "pending", "failed", "missing", "downloading"),
    )
    deleted = set(report.deleted)
    erasable = [
        c.call_id for c in findings.calls if c.recording_id is None or c.recording_id in deleted
    ]
    scrubbed = index.calls.scrub_numbers(erasable)
    index.audit.record(
        actor,
        audit.SUBJECT_REQUEST,
        masked(findings.number),
        f"erase: {len(report.deleted)} recordings deleted, {len(report.refused)} kept, "
        f"{scrubbed} calls blanked; reason: {reason}",
        remote_addr,
        at=now,
    )
    return SubjectErasure(findings.number, report.deleted, report.refused, scrubbed)
