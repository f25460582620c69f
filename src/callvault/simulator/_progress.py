"""Call-progress reports: what the PBX pushes while a call rings, is answered and ends.

A real PBX does not only send NewCdr: integrators build on the reports before it. For each
placed call the simulator sends, in this order and before its NewCdr (all at hang-up time:
the simulator places calls that have just ended, so only the order is realistic):

* answered:            Busy(caller) ALERT RING Ringing(callee) ANSWER ANSWERED Busy(callee)
                       BYE Idle(caller) Idle(callee)
* NO ANSWER/VOICEMAIL: Busy(caller) ALERT RING Ringing(callee) BYE Idle(caller) Idle(callee)
* BUSY/FAILED:         Busy(caller) CallFailed Idle(caller)

where Busy/Ringing/Idle are ExtensionStatus reports, sent only for parties that are
extensions. What this rests on (tags as in the protocol reference, section 0):

* [D] Report names, keys and party objects: GH-EN ``api_sample/call_report.md`` and
  ``call-report/*.md`` (2017: ``ext`` repeated once per party, e.g.
  ``{"action":"RING","callid":..,"ext":{"extid":"1000"},"ext":{"extid":"1002"}}``); V1
  ``api_ringing.html``, ``api_ring_back.html``, ``api_call_answered.html``,
  ``api_call_released.html``, ``api_call_failure.html`` and the identical K2/Cloud pages
  (format 1.0.2: parties in a ``call`` array; ALERT names the caller, RING and ANSWER the
  callee first, ANSWERED the caller first; an outbound leg is ``{"from","to","trunk",
  "outboundid"}`` whose id is the callid's successor, an inbound leg ``{"from","to","trunk",
  "inboundid"}`` with the callid; ``sn`` last).
* [D] CallFailed keeps separate ``outbound``/``inbound`` and ``ext`` keys even in 1.0.2
  (V1 example ``"reason":"486 Busy Here"``); reasons used: ``486 Busy Here`` (busy) and
  ``Line unreachable`` / ``404 NOT found`` (failed, outbound / otherwise).
* [D] ExtensionStatus ``{"extension","status"}`` (GH-EN ``change-of-extension-status.md``,
  Cloud V1): Ringing, Busy (off-hook), Idle (on-hook). In v2 (S-Series v2 zh, K2/Cloud v2
  ``event-ExtensionStatus.html``) a SIP extension back from busy reports ``Registered``;
  ``Idle`` is for FXS ports only, so 2.0.0 reports ``Registered`` where the others say Idle.
* [D] Format 2.0.0 has no RING/ALERT/ANSWER/ANSWERED/BYE reports: one ``CallStatus``
  event per change, ``{"event":"CallStatus","callid","members":[{"ext":{"number",
  "channelid","memberstatus"}} | {"inbound"|"outbound":{"from","to","trunkname",
  "channelid","memberstatus"}}],"sn"}`` with memberstatus ALERT (caller ringing back),
  RING (callee), ANSWERED (caller), ANSWER (callee), HOLD, BYE (S-Series/Cloud v2
  ``event-CallStatus.html``; v2 peers in the code index dispatch on ``event`` ==
  ``CallStatus``/``ExtensionStatus``/``NewCdr`` [3P]). v2 ``CallFailed`` lists only
  extensions as members, ``{"number","channelid"}`` (Cloud v2 ``event-CallFailed.html``).
* [I] Channel ids look like the v2 examples (``PJSIP/1020-0000001e``,
  ``PJSIP/trunk-siptrunk-endpoint-0000001f``). The caller hangs up. At BYE every member of
  a v2 CallStatus is BYE. VOICEMAIL is reported like NO ANSWER (v2: "CallFailed report
  excludes calls that are routed to voicemail").
* Divergence: the V1 ringing page says RING is sent only for calls dialled through the
  API; its own examples and the 2017 page show it for ordinary calls. Reports about
  extensions need "Status Monitor" enabled on the PBX: the simulator behaves as if it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from callvault.pbx import CallDetail, EventFormat
from callvault.simulator._events import dump_pairs

PartyKind = Literal["ext", "inbound", "outbound"]

_ANSWERED = frozenset({"ANSWERED", "ANSWERD"})
_FAILED = frozenset({"BUSY", "FAILED"})


@dataclass(frozen=True)
class Party:
    """One side of a call: an extension, or an external leg through a trunk."""

    kind: PartyKind
    number: str  # the extension's number; the external number for a trunk leg
    channel: str
    frm: str = ""
    to: str = ""
    trunk: str = ""
    leg_id: str = ""

    @property
    def is_extension(self) -> bool:
        return self.kind == "ext"

    def v1(self) -> dict[str, str]:
        """The party object of format legacy and 1.0.2 (``ext`` / ``inbound`` / ``outbound``)."""
        if self.kind == "ext":
            return {"extid": self.number}
        return {"from": self.frm, "to": self.to, "trunk": self.trunk, f"{self.kind}id": self.leg_id}

    def v2(self, status: str | None) -> dict[str, str]:
        """The member object of format 2.0.0; `status` None leaves memberstatus out."""
        if self.kind == "ext":
            member = {"number": self.number, "channelid": self.channel}
        else:
            member = {
                "from": self.frm,
                "to": self.to,
                "trunkname": self.trunk,
                "channelid": self.channel,
            }
        if status is not None:
            member["memberstatus"] = status
        return member


@dataclass(frozen=True)
class CallParties:
    """Who called whom, as the progress reports name them."""

    caller: Party
    callee: Party

    @property
    def extensions(self) -> list[Party]:
        return [p for p in (self.caller, self.callee) if p.is_extension]


def parties_of(
    cdr: CallDetail, *, outbound_leg_id: str, next_channel: Callable[[], int]
) -> CallParties:
    """The two parties of `cdr` by its type; `next_channel` numbers the channels."""

    def ext(number: str) -> Party:
        return Party("ext", number, f"PJSIP/{number}-{next_channel():08x}")

    def leg(kind: PartyKind, trunk: str, leg_id: str, number: str) -> Party:
        channel = f"PJSIP/trunk-{trunk or 'trunk'}-endpoint-{next_channel():08x}"
        return Party(kind, number, channel, cdr.callfrom, cdr.callto, trunk, leg_id)

    kind = cdr.type.strip().lower()
    if kind == "inbound":
        caller = leg("inbound", cdr.srctrunkname, cdr.callid, cdr.callfrom)
        return CallParties(caller, ext(cdr.callto))
    if kind == "outbound":
        caller = ext(cdr.callfrom)
        return CallParties(caller, leg("outbound", cdr.dsttrunkname, outbound_leg_id, cdr.callto))
    return CallParties(ext(cdr.callfrom), ext(cdr.callto))


def failure_reason(cdr: CallDetail) -> str:
    """The CallFailed reason of a BUSY or FAILED call."""
    if cdr.status.strip().upper() == "BUSY":
        return "486 Busy Here"
    return "Line unreachable" if cdr.type.strip().lower() == "outbound" else "404 NOT found"


class _Reports:
    """Renders the reports of one call in one format."""

    def __init__(self, cdr: CallDetail, parties: CallParties, fmt: EventFormat, serial: str):
        self.cdr = cdr
        self.parties = parties
        self.fmt = fmt
        self.serial = serial
        self.key = "event" if fmt is EventFormat.V2_0_0 else "action"

    def extension_status(self, party: Party, status: str) -> bytes:
        if status == "Idle" and self.fmt is EventFormat.V2_0_0:
            status = "Registered"  # v2: a SIP extension back from busy (Idle is FXS only)
        return dump_pairs(
            [
                (self.key, "ExtensionStatus"),
                ("extension", party.number),
                ("status", status),
                ("sn", self.serial),
            ]
        )

    def call_report(self, name: str, parties: list[Party]) -> bytes:
        """ALERT, RING, ANSWER, ANSWERED or BYE naming `parties` in this order (v1 formats)."""
        head: list[tuple[str, Any]] = [(self.key, name), ("callid", self.cdr.callid)]
        pairs: list[tuple[str, Any]]
        if self.fmt is EventFormat.LEGACY:
            pairs = [(p.kind, p.v1()) for p in parties]
        else:
            pairs = [("call", [{p.kind: p.v1()} for p in parties])]
        return dump_pairs([*head, *pairs, ("sn", self.serial)])

    def call_status(self, caller: str, callee: str) -> bytes:
        """A 2.0.0 CallStatus with the members' current states."""
        members = [
            {self.parties.caller.kind: self.parties.caller.v2(caller)},
            {self.parties.callee.kind: self.parties.callee.v2(callee)},
        ]
        return dump_pairs(
            [
                (self.key, "CallStatus"),
                ("callid", self.cdr.callid),
                ("members", members),
                ("sn", self.serial),
            ]
        )

    def call_failed(self) -> bytes:
        reason = failure_reason(self.cdr)
        caller, callee = self.parties.caller, self.parties.callee
        if self.fmt is EventFormat.V2_0_0:
            extensions = [caller] if caller.is_extension else self.parties.extensions
            members = [{"ext": p.v2(None)} for p in extensions]
            return dump_pairs(
                [
                    (self.key, "CallFailed"),
                    ("callid", self.cdr.callid),
                    ("reason", reason),
                    ("members", members),
                    ("sn", self.serial),
                ]
            )
        # As the V1 example: reason, callid, the external leg (if any), the caller's extension.
        pairs: list[tuple[str, Any]] = [
            (self.key, "CallFailed"),
            ("reason", reason),
            ("callid", self.cdr.callid),
        ]
        pairs += [(p.kind, p.v1()) for p in (caller, callee) if not p.is_extension]
        if caller.is_extension:
            pairs.append(("ext", caller.v1()))
        return dump_pairs([*pairs, ("sn", self.serial)])


def progress_reports(
    cdr: CallDetail, parties: CallParties, fmt: EventFormat, serial: str
) -> list[bytes]:
    """The reports pushed for `cdr` before its NewCdr, in order, in format `fmt`."""
    reports = _Reports(cdr, parties, fmt, serial)
    caller, callee = parties.caller, parties.callee
    v2 = fmt is EventFormat.V2_0_0
    out: list[bytes] = []

    def status(party: Party, word: str) -> None:
        if party.is_extension:
            out.append(reports.extension_status(party, word))

    state = cdr.status.strip().upper()
    status(caller, "Busy")
    if state in _FAILED:
        out.append(reports.call_failed())
        status(caller, "Idle")
        return out
    if v2:
        out.append(reports.call_status("ALERT", "RING"))
    else:
        out.append(reports.call_report("ALERT", [caller]))
        out.append(reports.call_report("RING", [callee, caller]))
    status(callee, "Ringing")
    if state in _ANSWERED:
        if v2:
            out.append(reports.call_status("ANSWERED", "ANSWER"))
        else:
            out.append(reports.call_report("ANSWER", [callee, caller]))
            out.append(reports.call_report("ANSWERED", [caller, callee]))
        status(callee, "Busy")
    if v2:
        out.append(reports.call_status("BYE", "BYE"))
    else:
        out.append(reports.call_report("BYE", [caller, callee]))  # the caller hangs up
    status(caller, "Idle")
    status(callee, "Idle")
    return out
