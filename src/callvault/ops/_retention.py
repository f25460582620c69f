"""Retention, legal holds and deleting recordings: what `callvault retention`, `hold`,
`delete` and `subject`, serve's daily pass and the web app's admin pages share.

    set_policy(index, text, ...) -> RetentionPolicy     # from a TOML or JSON file's text
    run_retention(archive, now=..., dry_run=...) -> RetentionReport
    delete_now(archive, ids, reason=..., ...) -> DeleteReport   # an admin's "delete now"
    place_hold(archive, case, reason, ids, ...) / release_hold(archive, id, reason, ...)

Deleting a recording makes its row a tombstone first (state ``deleted``, with its hash,
size, key, when and why, chained into the audit log), then removes the stored object; an
object whose removal failed is tried again by the next pass. Nothing deletes a recording
that a hold in force keeps, and nothing deletes outside a policy except `delete_now` with
a written reason.

On local disk these rules are enforced by callvault alone: anyone who can write the
archive directory can remove a file (which `callvault verify` then reports missing).
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from callvault.index import Index, audit
from callvault.index.retention import (
    Deletion,
    Hold,
    RetentionError,
    RetentionPolicy,
    RetentionRule,
    parse_rules,
)
from callvault.ops._archive import Archive
from callvault.ops._json import JsonResult
from callvault.ops._recordings import pbx_names
from callvault.storage import StorageError

log = logging.getLogger(__name__)

LISTED = 100  # recordings named in a report (the counts cover them all)


def parse_policy_text(text: str, *, where: str) -> list[object]:
    """The rules in a policy file's `text`: TOML (``[[rule]]`` tables) or JSON (a list, or
    an object with ``rule``/``rules``); RetentionError (one line) if it is neither."""
    stripped = text.lstrip()
    try:
        data: object
        if stripped.startswith(("[{", "{", "[ {", "[\n")) and not stripped.startswith("[["):
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise RetentionError(f"{where}: neither TOML nor JSON ({exc})") from None
    if isinstance(data, dict):
        data = data.get("rule", data.get("rules"))
    if not isinstance(data, list):
        raise RetentionError(f"{where}: no rules: write [[rule]] tables (see the docs)")
    return data


def check_rules(index: Index, rules: Sequence[object]) -> tuple[RetentionRule, ...]:
    """The rules parsed (RetentionError naming the first bad one), every PBX a rule names
    registered."""
    parsed = parse_rules(list(rules))
    known = set(pbx_names(index).values())
    for rule in parsed:
        for name in rule.pbx:
            if name not in known:
                raise RetentionError(
                    f"rule {rule.name}: no PBX is registered as {name!r} (`callvault pbx list`)"
                )
    return parsed


def draft_policy(index: Index, rules: Sequence[object], *, now: datetime) -> RetentionPolicy:
    """Rules not saved, as the version they would become: for a dry run
    (`run_retention(..., policy=draft)`) before saving."""
    parsed = check_rules(index, rules)
    current = index.retention.current()
    return RetentionPolicy(1 + (current.version if current else 0), parsed, now, "", "")


def set_policy(
    index: Index,
    rules: Sequence[object],
    *,
    actor: str,
    note: str,
    now: datetime,
    remote_addr: str = "",
) -> RetentionPolicy:
    """Check the rules (`check_rules`) and make them the policy in force (audited)."""
    parsed = check_rules(index, rules)
    return index.retention.set_policy(
        parsed, actor=actor, note=note, now=now, remote_addr=remote_addr
    )


@dataclass(frozen=True, slots=True)
class Expired(JsonResult):
    id: int
    name: str
    rule: str
    expired_at: datetime


@dataclass(frozen=True, slots=True)
class RetentionReport(JsonResult):
    """A retention pass: what it deleted (or, dry, would delete), by rule."""

    at: datetime
    dry_run: bool
    policy_version: int | None
    checked: int  # archived recordings weighed (held ones are not)
    deleted: int
    by_rule: dict[str, int]
    held: int  # expired but kept by a hold
    purged: int  # stored objects removed (this pass's and earlier ones')
    purge_failures: list[str] = field(default_factory=list)
    recordings: list[Expired] = field(default_factory=list)  # the first LISTED
    draft: bool = False  # rules not saved yet, tried

    def summary(self) -> str:
        if self.policy_version is None:
            return "no retention policy is set: every recording is kept"
        verb = "would delete" if self.dry_run else "deleted"
        rules = ", ".join(f"{count} by {rule}" for rule, count in sorted(self.by_rule.items()))
        held = f"; {self.held} expired but held" if self.held else ""
        which = (
            f"these rules (v{self.policy_version} once saved)"
            if self.draft
            else f"retention (policy v{self.policy_version})"
        )
        return (
            f"{which} {verb} {self.deleted} of {self.checked} recordings"
            + (f" ({rules})" if rules else "")
            + held
        )


def run_retention(
    archive: Archive,
    *,
    now: datetime,
    actor: str = audit.SYSTEM_ACTOR,
    dry_run: bool = False,
    policy: RetentionPolicy | None = None,
    remote_addr: str = "",
) -> RetentionReport:
    """Delete every archived recording whose rule's period has run out and that no hold
    keeps (only list them with `dry_run`); then remove stored objects still left over.
    `policy`: a draft to try instead of the policy in force (`draft_policy`; a dry run
    only)."""
    draft = policy is not None
    if draft and not dry_run:
        raise ValueError("a policy not saved can only be tried (dry_run)")
    index = archive.index
    policy = policy or index.retention.current()
    names = pbx_names(index)
    checked = deleted = held = 0
    by_rule: dict[str, int] = {}
    listed: list[Expired] = []
    if policy is not None:
        after = 0
        while batch := index.retention.candidates(after_id=after):
            after = batch[-1].recording_id
            for candidate in batch:
                checked += 1
                rule = policy.rule_for(candidate.call, names.get(candidate.pbx_id, ""))
                start = candidate.start_at or candidate.archived_at
                expiry = None if rule is None or start is None else rule.keep.expiry(start)
                if rule is None or expiry is None or expiry > now:
                    continue
                if not dry_run:
                    deletion = Deletion(
                        "retention", actor, policy_version=policy.version, rule=rule.name
                    )
                    key = index.retention.delete(candidate.recording_id, deletion, now=now)
                    if key is None:  # held or changed meanwhile
                        continue
                    if key:
                        _purge(archive, candidate.recording_id, key, now)
                deleted += 1
                by_rule[rule.name] = by_rule.get(rule.name, 0) + 1
                if len(listed) < LISTED:
                    listed.append(
                        Expired(candidate.recording_id, candidate.name, rule.name, expiry)
                    )
        held = _expired_but_held(index, policy, now)
    purged, failures = (0, []) if dry_run else _purge_left_over(archive, now)
    report = RetentionReport(
        at=now,
        dry_run=dry_run,
        policy_version=None if policy is None else policy.version,
        checked=checked,
        deleted=deleted,
        by_rule=by_rule,
        held=held,
        purged=purged,
        purge_failures=failures,
        recordings=listed,
        draft=draft,
    )
    if not dry_run and (deleted or purged):
        index.audit.record(
            actor, audit.RETENTION_RUN, "recordings", report.summary(), remote_addr, at=now
        )
    return report


def _expired_but_held(index: Index, policy: RetentionPolicy, now: datetime) -> int:
    """How many archived recordings a hold keeps that the policy would let go now."""
    held: set[int] = set()
    for hold in index.retention.holds(active_only=True):
        held.update(index.retention.held_recordings(hold.id))
    archived = [row.id for row in index.recordings.by_ids(sorted(held)) if row.state == "archived"]
    expiries = (index.retention.expiry_for(recording_id, policy) for recording_id in archived)
    return sum(1 for expiry in expiries if expiry is not None and expiry <= now)


def _purge(archive: Archive, recording_id: int, key: str, now: datetime) -> bool:
    """Remove the stored object of a deleted recording; whether it is gone."""
    try:
        archive.storage.delete(key)
    except (OSError, StorageError) as exc:
        log.warning(
            "recording %d is deleted but its object is not removed yet: %s", recording_id, exc
        )
        return False
    archive.index.retention.mark_purged(recording_id, now=now)
    return True


def _purge_left_over(archive: Archive, now: datetime) -> tuple[int, list[str]]:
    purged, failures = 0, []
    for recording_id, key in archive.index.retention.unpurged():
        if _purge(archive, recording_id, key, now):
            purged += 1
        else:
            failures.append(f"recording {recording_id}: {archive.storage.locate(key)}")
    return purged, failures


@dataclass(frozen=True, slots=True)
class Refused(JsonResult):
    id: int
    reason: str


@dataclass(frozen=True, slots=True)
class DeleteReport(JsonResult):
    deleted: list[int]
    refused: list[Refused]


def delete_now(
    archive: Archive,
    ids: Sequence[int],
    *,
    reason: str,
    actor: str,
    now: datetime,
    why: str = "admin",
    remote_addr: str = "",
    states: Sequence[str] = ("archived",),
) -> DeleteReport:
    """Delete these recordings now, outside the policy: an admin's decision (`why`
    "admin") or a data subject's erasure ("subject", which also deletes recordings not
    archived yet, `states`, so that none is downloaded afterwards), with a written
    `reason`, each audited. Held recordings are refused, with their holds named."""
    if not reason.strip():
        # In words, not the CLI's flag (--reason): the web app's form says it too.
        raise RetentionError("deleting outside the retention policy needs a written reason")
    index = archive.index
    holds = index.retention.holds_on(list(ids))
    rows = {row.id: row for row in index.recordings.by_ids(list(ids))}
    deleted: list[int] = []
    refused: list[Refused] = []
    for recording_id in ids:
        row = rows.get(recording_id)
        if row is None:
            refused.append(Refused(recording_id, "no such recording"))
            continue
        if recording_id in holds:
            cases = ", ".join(f"hold {h.id} ({h.case})" for h in holds[recording_id])
            refused.append(Refused(recording_id, f"kept by {cases}"))
            continue
        if row.state not in states:
            refused.append(Refused(recording_id, f"it is {row.state}"))
            continue
        deletion = Deletion(why, actor, reason=reason)
        if (
            index.retention.delete(
                recording_id, deletion, now=now, remote_addr=remote_addr, states=states
            )
            is None
        ):
            refused.append(Refused(recording_id, "kept by a hold placed meanwhile"))
            continue
        if row.storage_key is not None and row.state == "archived":
            _purge(archive, recording_id, row.storage_key, now)
        else:
            index.retention.mark_purged(recording_id, now=now)  # nothing was stored
        deleted.append(recording_id)
    return DeleteReport(deleted, refused)


def place_hold(
    archive: Archive,
    case: str,
    reason: str,
    ids: Sequence[int],
    *,
    selection: str,
    actor: str,
    now: datetime,
    remote_addr: str = "",
) -> Hold:
    """Hold these recordings for the case (RetentionError: no case, no reason, nothing);
    on a bucket with Object Lock each object gets the bucket's legal hold too."""
    if not ids:
        raise RetentionError("nothing to hold: the selection matches no recording")
    hold = archive.index.retention.add_hold(
        case, reason, ids, selection=selection, actor=actor, now=now, remote_addr=remote_addr
    )
    sync_legal_holds(archive, archive.index.retention.held_recordings(hold.id))
    return hold


def release_hold(
    archive: Archive,
    hold_id: int,
    *,
    reason: str,
    actor: str,
    now: datetime,
    remote_addr: str = "",
) -> Hold:
    """Release a hold (RetentionError if none such is in force); on a bucket with Object
    Lock the objects no other hold keeps lose the bucket's legal hold."""
    ids = archive.index.retention.held_recordings(hold_id)
    hold = archive.index.retention.release_hold(
        hold_id, reason=reason, actor=actor, now=now, remote_addr=remote_addr
    )
    sync_legal_holds(archive, ids)
    return hold


def sync_legal_holds(archive: Archive, ids: Sequence[int]) -> list[str]:
    """Make the storage's legal hold of these recordings' objects say what callvault's
    holds say (where the storage locks); what could not be done, in words (also logged:
    callvault's own hold applies meanwhile, and `verify` reports the difference)."""
    storage = archive.storage
    if not ids or not storage.locks:
        return []
    held = archive.index.retention.holds_on(list(ids))
    problems = []
    for row in archive.index.recordings.by_ids(list(ids)):
        if row.state != "archived" or not row.storage_key:
            continue
        try:
            storage.legal_hold(row.storage_key, row.id in held)
        except (OSError, StorageError) as exc:
            problems.append(f"recording {row.id}: {exc}")
            log.warning("the bucket's legal hold of recording %d is not set: %s", row.id, exc)
    return problems
