"""The tamper-evident audit log: the deployment's signing key, checkpoints, verification.

`callvault audit verify`, `callvault keys show` and the web app's audit page share these:

    signer(index, keyring, ...) -> SigningKey          # the key that signs (made if none)
    rotate_signing_key(index, keyring, ...) -> SigningKey
    public_keys(index) -> list[PublicKeyView]
    write_checkpoint(index, key, now=...) -> bool      # sign the chain's head
    verify_audit(index, now=..., trusted=...) -> AuditVerification
    record_verification(index, report, ...)            # audit it, remember it for the page

What verification finds, in the order it looks (the first problem named is the first row
that was altered, removed, inserted or reordered):

1. the chain, entry by entry: seqs 1, 2, 3... without a gap, each hash recomputed from
   the one before (an entry changed, removed, moved or inserted breaks it there), and the
   head row agreeing with the last entry (entries removed from the end);
2. entries without a place in the chain (written into the table by hand);
3. every signed checkpoint: signed by a key of the deployment (or one given), and the
   chain's hash at its entry what was signed (a chain rewritten from some entry on, with
   every hash recomputed, passes step 1 but not this);
4. every archived recording against its `archive` entry: SHA-256, size, storage key,
   name and PBX as attested when it was archived.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from callvault.index import Index, SettingKey, audit
from callvault.keys import Keyring, MasterKeyError, PublicKey, SigningKey
from callvault.ops._json import JsonResult

MAX_PROBLEMS = 20  # named in a report; the count says how many more


@dataclass(frozen=True, slots=True)
class PublicKeyView(JsonResult):
    """A signing key as anyone may see it."""

    id: str
    fingerprint: str  # SHA-256 of the DER public key (`openssl pkey -pubin -outform DER`)
    pem: str
    created_at: datetime
    retired_at: datetime | None

    @property
    def active(self) -> bool:
        return self.retired_at is None


def public_keys(index: Index) -> list[PublicKeyView]:
    """The deployment's signing keys, the newest first (the first not retired signs)."""
    views = []
    for record in index.signing_keys.all():
        key = PublicKey.from_b64(record.public_key)
        views.append(
            PublicKeyView(key.id, key.fingerprint, key.pem(), record.created_at, record.retired_at)
        )
    return views


def signer(
    index: Index, keyring: Keyring, *, now: datetime, actor: str = audit.SYSTEM_ACTOR
) -> SigningKey:
    """The deployment's signing key, opened with the master keyring; the first one is
    made (and audited) when there is none. MasterKeyError (one line) if it does not open."""
    record = index.signing_keys.active()
    if record is None:
        return _new_key(index, keyring, now=now, actor=actor)
    return SigningKey.unsealed(record.private_sealed, record.id, keyring)


def rotate_signing_key(
    index: Index, keyring: Keyring, *, now: datetime, actor: str, remote_addr: str = "local"
) -> SigningKey:
    """Make a new signing key and retire the others (kept, to check what they signed)."""
    key = _new_key(index, keyring, now=now, actor=actor, remote_addr=remote_addr)
    for retired in index.signing_keys.retire_all_but(key.id, now=now):
        index.audit.record(actor, audit.SIGNING_KEY_RETIRE, retired, "", remote_addr, at=now)
    return key


def _new_key(
    index: Index, keyring: Keyring, *, now: datetime, actor: str, remote_addr: str = "local"
) -> SigningKey:
    key = SigningKey.generate()
    index.signing_keys.add(key.id, key.public.b64(), key.sealed(keyring), now=now)
    detail = json.dumps({"fingerprint": key.public.fingerprint, "master_key": keyring.primary.id})
    index.audit.record(actor, audit.SIGNING_KEY_CREATE, key.id, detail, remote_addr, at=now)
    return key


class ChainBrokenError(ValueError):
    """The chain since the last checkpoint does not hold: it is not signed (one line)."""


def write_checkpoint(index: Index, key: SigningKey, *, now: datetime) -> int | None:
    """Sign the chain's head, if it moved since the last checkpoint; the seq signed (None
    if nothing was new). Every serve node does so every few minutes, and `audit verify`
    before it checks.

    The entries since the last checkpoint are checked first, so that a chain altered in
    the meantime is never signed: ChainBrokenError names the entry where it breaks."""
    seq, chain_hash = index.audit.head()
    checkpoints = index.audit.checkpoints()
    last = checkpoints[-1] if checkpoints else None
    if seq == 0 or (last is not None and seq <= last.seq):
        return None
    previous, expected = (audit.GENESIS, 1) if last is None else (last.hash, last.seq + 1)
    for entry in index.audit.chain(after_seq=expected - 1):
        if entry.seq != expected or entry.hash != audit.entry_hash(
            previous,
            expected,
            entry.at,
            entry.actor,
            entry.action,
            entry.target,
            entry.detail,
            entry.remote_addr,
        ):
            raise ChainBrokenError(
                f"the audit chain breaks at entry {expected}: not signing it; run "
                "`callvault audit verify`"
            )
        previous = entry.hash
        expected += 1
        if expected > seq:
            break
    if previous != chain_hash:
        raise ChainBrokenError(
            f"the audit chain's head (entry {seq}) is not its last entry: not signing it; run "
            "`callvault audit verify`"
        )
    signature = key.sign(audit.checkpoint_message(seq, chain_hash, now))
    index.audit.add_checkpoint(
        seq, chain_hash, now, key.id, base64.b64encode(signature).decode("ascii")
    )
    return seq


@dataclass(frozen=True, slots=True)
class AuditProblem(JsonResult):
    """Something verification found: `seq` (or `recording`) names where."""

    kind: str  # altered | missing | inserted | checkpoint | recording
    message: str
    seq: int | None = None
    recording: int | None = None


@dataclass(frozen=True, slots=True)
class AuditVerification(JsonResult):
    """What `verify_audit` checked and found; `ok` when nothing was found."""

    at: datetime
    entries: int  # chained entries checked
    head_seq: int
    checkpoints: int  # checkpoints whose signature and hash were checked
    last_checkpoint_seq: int | None
    last_checkpoint_at: datetime | None
    recordings: int  # archived recordings compared with their attestation
    recordings_before_chain: int  # archived before the chain began: not attested
    keys: list[str]  # the ids of the keys checkpoints were checked against
    problems: list[AuditProblem] = field(default_factory=list)
    more_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line for a person (and the audit log's detail)."""
        if self.ok:
            return (
                f"the audit chain is intact: {self.entries} entries, {self.checkpoints} "
                f"signed checkpoints, {self.recordings} recordings as attested"
            )
        more = f" (and {self.more_problems} more)" if self.more_problems else ""
        extra = len(self.problems) - 1 + self.more_problems
        others = f"; {extra} other problems{more}" if extra else ""
        return f"the audit chain is broken: {self.problems[0].message}{others}"


class _Findings:
    def __init__(self) -> None:
        self.problems: list[AuditProblem] = []
        self.more = 0

    def add(self, problem: AuditProblem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more += 1


def verify_audit(
    index: Index, *, now: datetime, trusted: Sequence[PublicKey] | None = None
) -> AuditVerification:
    """Check the audit chain, its checkpoints and the recordings it attests (see the
    module docstring). Checkpoints are checked against `trusted` keys when given (a
    public key kept outside the database), else against the deployment's own keys."""
    findings = _Findings()
    checkpoints = index.audit.checkpoints()
    wanted = {checkpoint.seq for checkpoint in checkpoints}
    hashes_at: dict[int, str] = {}
    previous, expected, entries, broken = audit.GENESIS, 1, 0, False
    recordings_before = 0
    for entry in index.audit.chain():
        seq = entry.seq or 0
        if seq != expected:
            findings.add(
                AuditProblem(
                    "missing",
                    f"entries {expected} to {seq - 1} are missing: removed from the log"
                    if seq - 1 > expected
                    else f"entry {expected} is missing: removed from the log",
                    expected,
                )
            )
            broken = True
        computed = audit.entry_hash(
            previous,
            seq,
            entry.at,
            entry.actor,
            entry.action,
            entry.target,
            entry.detail,
            entry.remote_addr,
        )
        if computed != entry.hash and not broken:
            findings.add(
                AuditProblem(
                    "altered",
                    f"entry {seq} ({entry.action} by {entry.actor or 'nobody'} at "
                    f"{entry.at:%Y-%m-%d %H:%M:%S} UTC) does not match the chain: it was "
                    "altered, moved, or inserted, or an entry before it was removed",
                    seq,
                )
            )
            broken = True
        if entry.action == audit.CHAIN_START and recordings_before == 0:
            recordings_before = _recordings_before(entry.detail)
        # Past a break, carry on from the stored hashes, so that a later break is found too
        # and checkpoints after it can still be compared with what the table holds.
        previous = entry.hash or computed
        broken = False if entry.hash == computed else broken
        if seq in wanted:
            hashes_at[seq] = previous
        expected = seq + 1
        entries += 1
    head_seq, head_hash = index.audit.head()
    last = expected - 1
    if head_seq > last:
        findings.add(
            AuditProblem(
                "missing",
                f"entries {last + 1} to {head_seq} (the end of the log) are missing: removed",
                last + 1,
            )
        )
    elif head_seq < last or (head_seq and head_hash != previous):
        findings.add(
            AuditProblem(
                "inserted",
                f"the log goes on past its head (entry {head_seq}): entries were added or "
                "changed at its end behind callvault's back",
                head_seq + 1,
            )
        )
    for entry in index.audit.unchained():
        findings.add(
            AuditProblem(
                "inserted",
                f"the row with id {entry.id} ({entry.action} by {entry.actor or 'nobody'}) has "
                "no place in the chain: it was written into the table behind callvault's back",
            )
        )
    keys = _checkpoint_keys(index, trusted)
    checked = 0
    for checkpoint in checkpoints:
        message = _checkpoint_problem(checkpoint, keys, hashes_at, trusted is not None)
        if message:
            findings.add(AuditProblem("checkpoint", message, checkpoint.seq))
        checked += 1
    recordings, unattested = _check_recordings(index, recordings_before, findings)
    last_checkpoint = checkpoints[-1] if checkpoints else None
    return AuditVerification(
        at=now,
        entries=entries,
        head_seq=head_seq,
        checkpoints=checked,
        last_checkpoint_seq=None if last_checkpoint is None else last_checkpoint.seq,
        last_checkpoint_at=None if last_checkpoint is None else last_checkpoint.at,
        recordings=recordings,
        recordings_before_chain=unattested,
        keys=sorted(keys),
        problems=findings.problems,
        more_problems=findings.more,
    )


def _recordings_before(detail: str) -> int:
    try:
        return int(json.loads(detail)["recordings_before"])
    except (ValueError, KeyError, TypeError):
        return 0


def _checkpoint_keys(index: Index, trusted: Sequence[PublicKey] | None) -> dict[str, PublicKey]:
    if trusted is not None:
        return {key.id: key for key in trusted}
    return {record.id: PublicKey.from_b64(record.public_key) for record in index.signing_keys.all()}


def _checkpoint_problem(
    checkpoint: audit.Checkpoint, keys: dict[str, PublicKey], hashes_at: dict[int, str], given: bool
) -> str | None:
    where = f"the checkpoint of entry {checkpoint.seq} ({checkpoint.at:%Y-%m-%d %H:%M} UTC)"
    key = keys.get(checkpoint.key_id)
    if key is None:
        whose = "the key you gave" if given else "any key of this deployment"
        return f"{where} is signed by key {checkpoint.key_id}, which is not {whose}"
    try:
        signature = base64.b64decode(checkpoint.signature, validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    message = audit.checkpoint_message(checkpoint.seq, checkpoint.hash, checkpoint.at)
    if not key.verify(signature, message):
        return f"{where} does not carry a valid signature of key {key.id}: it was altered"
    actual = hashes_at.get(checkpoint.seq)
    if actual is None:
        return f"{where} names an entry the log does not hold: entries were removed"
    if actual != checkpoint.hash:
        return (
            f"{where} was signed for another log: an entry at or before {checkpoint.seq} was "
            "altered and the chain recomputed after it"
        )
    return None


def _check_recordings(index: Index, before: int, findings: _Findings) -> tuple[int, int]:
    """Compare each archived recording with its `archive` entry; (checked, unattested)."""
    checked = unattested = 0
    for row in index.audit.attested_recordings():
        if row.audit_seq is None:
            if row.recording_id <= before:
                unattested += 1
                continue
            findings.add(
                AuditProblem(
                    "recording",
                    f"recording {row.recording_id} ({row.name}) is archived but no entry of the "
                    "chain attests it: its link to the log was removed",
                    recording=row.recording_id,
                )
            )
            continue
        checked += 1
        expected = audit.attestation(
            row.recording_id,
            row.pbx_id,
            row.name,
            row.storage_key or "",
            row.sha256 or "",
            row.size if row.size is not None else -1,
        )
        if row.detail != expected:
            findings.add(
                AuditProblem(
                    "recording",
                    f"recording {row.recording_id} ({row.name}) is not what entry "
                    f"{row.audit_seq} attests: {_differences(row.detail, expected)} changed in "
                    "the index",
                    seq=row.audit_seq,
                    recording=row.recording_id,
                )
            )
    for entry in index.audit.orphan_attestations():
        findings.add(
            AuditProblem(
                "recording",
                f"entry {entry.seq} attests recording {entry.target}, which the index no "
                "longer holds as it was: its row was deleted or its link changed",
                seq=entry.seq,
            )
        )
    return checked, unattested


def _differences(attested: str | None, actual: str) -> str:
    if attested is None:
        return "its link to the log"
    try:
        was, now = json.loads(attested), json.loads(actual)
    except ValueError:
        return "its attestation"
    names = {"sha256": "its SHA-256", "size": "its size", "key": "its storage key"}
    changed = [names.get(name, f"its {name}") for name in sorted(now) if was.get(name) != now[name]]
    return " and ".join(changed) or "its attestation"


def record_verification(
    index: Index, report: AuditVerification, *, actor: str, remote_addr: str = "local"
) -> None:
    """Audit a verification (in the chain it checked) and keep its outcome for the web
    app's audit page ("last verified")."""
    index.audit.record(
        actor, audit.AUDIT_VERIFY, "audit_log", report.summary(), remote_addr, at=report.at
    )
    index.settings.set(
        SettingKey.AUDIT_VERIFIED,
        json.dumps(
            {
                "at": report.at.isoformat(),
                "ok": report.ok,
                "by": actor,
                "entries": report.entries,
                "summary": report.summary(),
            }
        ),
        report.at,
    )


def last_verification(index: Index) -> dict[str, object] | None:
    """The outcome `record_verification` kept last (None if the chain was never checked)."""
    text = index.settings.get(SettingKey.AUDIT_VERIFIED)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_public_key(text: str, *, where: str) -> PublicKey:
    """A public key given by a person: PEM text; MasterKeyError (one line) otherwise."""
    if "BEGIN PUBLIC KEY" not in text:
        raise MasterKeyError(f"{where}: not a PEM public key (as `callvault keys show` prints)")
    return PublicKey.from_pem(text, where=where)
