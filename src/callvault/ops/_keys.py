"""Rotating the master keys: re-seal every sealed value under the primary key.

After a new master key is put first in the key file (the old one kept below it),
`rotate_master_keys` re-seals, under the new primary, everything an older key sealed:

* the data keys of encrypted recordings (`recordings.data_key`), a batch at a time: the
  audio itself is not touched (its data key does not change, only how it is wrapped);
* the registered PBXs' passwords, P-Series webhook secrets and the P-Series tokens kept
  for the next run (a token set that no longer opens is dropped: the PBX gives another);
* the private halves of the deployment's signing keys.

Each value is replaced only if it is still the one read (a concurrent change wins), and
what is done is done for good, so an interrupted rotation resumes where it stopped when
run again (the values still under an old key are what is left). When it reports nothing
left and nothing failed, the old key can be removed from the key file. One `keys_rotate`
audit entry says what was re-sealed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from callvault.index import Index, audit
from callvault.index.pbxs import password_context, tokens_context, webhook_secret_context
from callvault.keys import (
    SEALED_PREFIX,
    Keyring,
    MasterKeyError,
    recording_context,
    signing_context,
)
from callvault.ops._json import JsonResult

BATCH = 500


@dataclass(frozen=True, slots=True)
class RotationReport(JsonResult):
    """What `rotate_master_keys` re-sealed under `primary` (a key id); `failed` lists the
    values that did not open (one line each, at most 20), `remaining` how many values are
    still sealed under another key."""

    primary: str
    recordings: int = 0
    pbx_passwords: int = 0
    signing_keys: int = 0
    webhook_secrets: int = 0
    pbx_tokens: int = 0
    failed: list[str] = field(default_factory=list)
    failures: int = 0
    remaining: int = 0


def _under(sealed: str, key_id: str) -> bool:
    return sealed.startswith(f"{SEALED_PREFIX}{key_id}.")


def pending_rotation(index: Index, keyring: Keyring) -> int:
    """How many sealed values are not under the primary master key."""
    primary = keyring.primary.id
    count = index.recordings.count_sealed_data_keys(not_under=primary)
    for record in index.pbxs.list():
        tokens = index.pbxs.load_tokens(record.id)
        count += sum(
            1
            for sealed in (record.password_sealed, record.webhook_secret_sealed, tokens)
            if sealed and not _under(sealed, primary)
        )
    count += sum(1 for key in index.signing_keys.all() if not _under(key.private_sealed, primary))
    return count


def rotate_master_keys(
    index: Index,
    keyring: Keyring,
    *,
    now: datetime,
    actor: str,
    remote_addr: str = "local",
    progress: Callable[[int, int], None] | None = None,
    batch: int = BATCH,
) -> RotationReport:
    """Re-seal under the primary master key every value sealed under another one (see the
    module docstring); `progress(done, total)` after each batch of recordings."""
    primary = keyring.primary.id
    failed: list[str] = []
    failures = 0

    def failure(message: str) -> None:
        nonlocal failures
        failures += 1
        if len(failed) < 20:
            failed.append(message)

    total = index.recordings.count_sealed_data_keys(not_under=primary)
    done = recordings = 0
    after = 0
    while True:
        rows = index.recordings.sealed_data_keys(not_under=primary, after_id=after, limit=batch)
        if not rows:
            break
        changes: list[tuple[int, str, str]] = []
        for recording_id, sealed in rows:
            context = recording_context(recording_id)
            try:
                changes.append(
                    (recording_id, sealed, keyring.seal(keyring.open(sealed, context), context))
                )
            except MasterKeyError as exc:
                failure(str(exc))
        recordings += index.recordings.reseal_data_keys(changes)
        after = rows[-1][0]
        done += len(rows)
        if progress is not None:
            progress(min(done, total), total)
    passwords = 0
    for record in index.pbxs.list():
        sealed = record.password_sealed
        if not sealed or _under(sealed, primary):
            continue
        context = password_context(record.name)
        try:
            resealed = keyring.seal(keyring.open(sealed, context), context)
        except MasterKeyError as exc:
            failure(str(exc))
            continue
        index.pbxs.update(record.name, {}, password_sealed=resealed, now=now)
        passwords += 1
    webhook_secrets = tokens = 0
    for record in index.pbxs.list():
        secret = record.webhook_secret_sealed
        if secret and not _under(secret, primary):
            context = webhook_secret_context(record.name)
            try:
                resealed = keyring.seal(keyring.open(secret, context), context)
            except MasterKeyError as exc:
                failure(str(exc))
            else:
                index.pbxs.set_webhook_secret(record.name, resealed, now=now)
                webhook_secrets += 1
        kept = index.pbxs.load_tokens(record.id)
        if kept and not _under(kept, primary):
            context = tokens_context(record.name)
            try:
                index.pbxs.save_tokens(
                    record.id, keyring.seal(keyring.open(kept, context), context)
                )
                tokens += 1
            except MasterKeyError:
                index.pbxs.save_tokens(record.id, None)  # short-lived: the PBX gives another
    signing = 0
    for key in index.signing_keys.all():
        if _under(key.private_sealed, primary):
            continue
        context = signing_context(key.id)
        try:
            resealed = keyring.seal(keyring.open(key.private_sealed, context), context)
        except MasterKeyError as exc:
            failure(str(exc))
            continue
        signing += index.signing_keys.reseal(key.id, key.private_sealed, resealed)
    remaining = pending_rotation(index, keyring)
    report = RotationReport(
        primary,
        recordings,
        passwords,
        signing,
        webhook_secrets,
        tokens,
        failed,
        failures,
        remaining,
    )
    detail = {
        "recordings": recordings,
        "pbx_passwords": passwords,
        "signing_keys": signing,
        "webhook_secrets": webhook_secrets,
        "pbx_tokens": tokens,
        "failed": failures,
        "remaining": remaining,
    }
    index.audit.record(actor, audit.KEYS_ROTATE, primary, json.dumps(detail), remote_addr, at=now)
    return report
