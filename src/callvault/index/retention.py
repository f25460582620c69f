"""Retention policies and legal holds: the rules, as data (the store is `index.retention`).

A *policy* is an ordered list of rules; the first rule that matches a recording's call
decides how long it is kept, counted from the call's start (or, if the PBX never said
when the call started, from when it was archived). A recording no rule matches is kept
for ever. Each change of the rules is a new *version* of the policy (the versions are
kept, and each change is in the audit chain).

A rule matches when every condition it has holds (a condition left out matches all):

* ``pbx``: the call's PBX is one of these registry names;
* ``direction``: the call's direction is one of these (Inbound, Outbound, Internal...,
  without regard to case);
* ``status``: the call's status is one of these (ANSWERED, NO ANSWER...);
* ``numbers``: the caller, the callee or the DID matches one of these: an extension or a
  range (``600-699``, as in a user's scope) or a pattern with ``*`` and ``?``
  (``+44*``).

``keep`` is ``<n>d``, ``<n>m`` or ``<n>y`` (days, calendar months, calendar years) or
``forever``.

A *legal hold* (case name and reason) keeps the recordings it holds whatever the policy:
none of them is deleted until every hold on it is released.
"""

from __future__ import annotations

import calendar
import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from callvault.index.users import UserError, in_scope, parse_scope

_KEEP_RE = re.compile(r"^\s*(\d{1,5})\s*([dmy])\s*$")
_RULE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/+-]{0,63}$")
FOREVER = "forever"
MAX_YEARS = 1000  # a longer period is "forever" (and past it dates leave the calendar)
_KEEP_MAX = {"d": MAX_YEARS * 366, "m": MAX_YEARS * 12, "y": MAX_YEARS}
RULE_FIELDS = ("name", "keep", "pbx", "direction", "status", "numbers")
# What a rule looks at of a call (the names of `calls` columns).
CALL_FIELDS = ("call_from", "call_to", "did", "direction", "status")


def call_facts(row: Any) -> dict[str, Any]:
    """The `CALL_FIELDS` of a row (a database row or a `RecordingRow`), for `matches`."""
    return {name: getattr(row, name) for name in CALL_FIELDS}


class RetentionError(ValueError):
    """A policy or hold that cannot be used: one line saying which rule and why."""


@dataclass(frozen=True, slots=True)
class Keep:
    """How long: `count` days, months or years (`unit` d, m, y), or for ever (count None)."""

    count: int | None
    unit: str = "d"

    @classmethod
    def parse(cls, text: str, *, where: str) -> Keep:
        if text.strip().lower() == FOREVER:
            return cls(None)
        match = _KEEP_RE.match(text.lower())
        if match is None:
            raise RetentionError(
                f"{where}: keep {text!r} is not a period: use e.g. 90d, 18m, 7y or forever"
            )
        count, unit = int(match.group(1)), match.group(2)
        if count > _KEEP_MAX[unit]:
            raise RetentionError(
                f"{where}: keep {text!r} is longer than {MAX_YEARS} years: say forever"
            )
        return cls(count, unit)

    def __str__(self) -> str:
        return FOREVER if self.count is None else f"{self.count}{self.unit}"

    def expiry(self, start: datetime) -> datetime | None:
        """When something that began at `start` has been kept long enough (None: never,
        which is also the answer past the calendar's last year, 9999)."""
        if self.count is None:
            return None
        if self.unit == "d":
            try:
                return start + timedelta(days=self.count)
            except OverflowError:
                return None
        months = self.count * (12 if self.unit == "y" else 1)
        year, month = divmod(start.month - 1 + months, 12)
        year += start.year
        if year > datetime.max.year:
            return None
        day = min(start.day, calendar.monthrange(year, month + 1)[1])
        return start.replace(year=year, month=month + 1, day=day)


@dataclass(frozen=True, slots=True)
class RetentionRule:
    name: str
    keep: Keep
    pbx: tuple[str, ...] = ()
    direction: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()

    def matches(self, call: Mapping[str, Any], pbx_name: str) -> bool:
        """Whether the call (a mapping with call_from, call_to, did, direction, status)
        of the PBX `pbx_name` is one this rule is about."""
        if self.pbx and pbx_name not in self.pbx:
            return False
        if self.direction and str(call.get("direction", "")).lower() not in self.direction:
            return False
        if self.status and str(call.get("status", "")).lower() not in self.status:
            return False
        if self.numbers:
            numbers = [str(call.get(name) or "") for name in ("call_from", "call_to", "did")]
            return any(_number_matches(pattern, numbers) for pattern in self.numbers)
        return True

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "keep": str(self.keep)}
        for name in ("pbx", "direction", "status", "numbers"):
            if getattr(self, name):
                data[name] = list(getattr(self, name))
        return data


def _number_matches(pattern: str, numbers: Sequence[str]) -> bool:
    if "*" in pattern or "?" in pattern:
        return any(number and fnmatch.fnmatchcase(number, pattern) for number in numbers)
    return in_scope(parse_scope(pattern), *numbers)


def _strings(value: Any, name: str, where: str, *, lower: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RetentionError(f"{where}: {name} must be a list of text values")
    return tuple(v.strip().lower() if lower else v.strip() for v in value)


def parse_rule(data: Any, number: int) -> RetentionRule:
    """The rule `data` (a mapping, as in the policy file), the `number`th of its policy."""
    where = f"rule {number}"
    if not isinstance(data, Mapping):
        raise RetentionError(f"{where}: a rule is a table of name, keep and conditions")
    unknown = sorted(set(data) - set(RULE_FIELDS))
    if unknown:
        raise RetentionError(
            f"{where}: unknown field {unknown[0]!r}: a rule has {', '.join(RULE_FIELDS)}"
        )
    name = data.get("name")
    if not isinstance(name, str) or not _RULE_NAME_RE.match(name):
        raise RetentionError(f"{where}: give it a name (letters, digits, spaces, up to 64)")
    where = f"rule {number} ({name})"
    if not isinstance(data.get("keep"), str):
        raise RetentionError(f'{where}: say how long to keep: keep = "7y" (or forever)')
    numbers = _strings(data.get("numbers"), "numbers", where)
    for pattern in numbers:
        if "*" not in pattern and "?" not in pattern:
            try:
                parse_scope(pattern)
            except UserError as exc:
                raise RetentionError(f"{where}: numbers: {exc}") from None
    return RetentionRule(
        name=name,
        keep=Keep.parse(data["keep"], where=where),
        pbx=_strings(data.get("pbx"), "pbx", where),
        direction=_strings(data.get("direction"), "direction", where, lower=True),
        status=_strings(data.get("status"), "status", where, lower=True),
        numbers=numbers,
    )


def parse_rules(data: Any) -> tuple[RetentionRule, ...]:
    """The rules of a policy: a list of rule mappings; RetentionError naming the first bad
    one (or two rules of one name)."""
    if not isinstance(data, list):
        raise RetentionError("a policy is a list of rules ([[rule]] tables in the file)")
    rules = tuple(parse_rule(item, number) for number, item in enumerate(data, 1))
    names = [rule.name for rule in rules]
    for name in names:
        if names.count(name) > 1:
            raise RetentionError(f"two rules are named {name!r}: give each its own name")
    return rules


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """A version of the policy: its rules, first match wins."""

    version: int
    rules: tuple[RetentionRule, ...]
    created_at: datetime
    created_by: str
    note: str = ""

    def rule_for(self, call: Mapping[str, Any], pbx_name: str) -> RetentionRule | None:
        return next((rule for rule in self.rules if rule.matches(call, pbx_name)), None)

    def rules_json(self) -> str:
        return json.dumps([rule.to_json() for rule in self.rules], separators=(",", ":"))

    def to_json(self) -> dict[str, Any]:
        """The version as `retention show --json` and `GET /api/retention` give it."""
        return {
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "note": self.note,
            "rules": [rule.to_json() for rule in self.rules],
        }

    @property
    def has_catch_all(self) -> bool:
        """Whether some rule matches every call (else the unmatched are kept for ever)."""
        return any(
            not (rule.pbx or rule.direction or rule.status or rule.numbers) for rule in self.rules
        )


@dataclass(frozen=True, slots=True)
class Hold:
    """A legal hold: recordings kept, whatever the policy, until it is released."""

    id: int
    case: str
    reason: str
    created_at: datetime
    created_by: str
    selection: str  # how its recordings were chosen, in words
    recordings: int
    released_at: datetime | None = None
    released_by: str | None = None
    release_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.released_at is None

    def to_json(self) -> dict[str, Any]:
        """The hold as `hold list --json` and `GET /api/holds` give it."""
        return {
            "id": self.id,
            "case": self.case,
            "reason": self.reason,
            "selection": self.selection,
            "recordings": self.recordings,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "released_at": self.released_at.isoformat() if self.released_at else None,
            "released_by": self.released_by,
            "release_reason": self.release_reason,
        }


@dataclass(frozen=True, slots=True)
class Deletion:
    """Why a recording was deleted (kept with its tombstone)."""

    why: str  # retention | admin | subject
    by: str
    reason: str = ""
    policy_version: int | None = None
    rule: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data: dict[str, Any] = {"why": self.why, "by": self.by}
        if self.reason:
            data["reason"] = self.reason
        if self.policy_version is not None:
            data["policy_version"] = self.policy_version
        if self.rule is not None:
            data["rule"] = self.rule
        data.update(self.extra)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))
