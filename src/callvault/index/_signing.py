"""`index.signing_keys`: the deployment's Ed25519 signing keys (see `callvault.keys`).

The public half is kept as Base64; the private half only sealed with the master key, so a
copy of the database cannot sign. The newest key not retired is the one that signs; a
retired key stays so that what it signed can still be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update

from callvault.index._db import Database
from callvault.index.schema import signing_keys
from callvault.times import as_utc, to_utc


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    id: str
    public_key: str  # Base64 of the 32 raw bytes
    private_sealed: str
    created_at: datetime
    retired_at: datetime | None


class SigningKeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, key_id: str, public_key: str, private_sealed: str, *, now: datetime) -> None:
        with self._db.write() as conn:
            conn.execute(
                insert(signing_keys).values(
                    id=key_id,
                    public_key=public_key,
                    private_sealed=private_sealed,
                    created_at=to_utc(now),
                )
            )

    def all(self) -> list[SigningKeyRecord]:
        """Every key, the newest first."""
        query = select(signing_keys).order_by(signing_keys.c.created_at.desc(), signing_keys.c.id)
        with self._db.read() as conn:
            return [
                SigningKeyRecord(
                    id=str(row.id),
                    public_key=str(row.public_key),
                    private_sealed=str(row.private_sealed),
                    created_at=as_utc(row.created_at) or to_utc(row.created_at),
                    retired_at=None if row.retired_at is None else as_utc(row.retired_at),
                )
                for row in conn.execute(query)
            ]

    def active(self) -> SigningKeyRecord | None:
        """The key that signs: the newest not retired (None if there is none)."""
        return next((key for key in self.all() if key.retired_at is None), None)

    def reseal(self, key_id: str, old: str, new: str) -> bool:
        """Replace the sealed private half of `key_id` (re-sealed under another master
        key), only if it still is `old`; whether it was replaced."""
        with self._db.write() as conn:
            result = conn.execute(
                update(signing_keys)
                .where(signing_keys.c.id == key_id, signing_keys.c.private_sealed == old)
                .values(private_sealed=new)
            )
        return (result.rowcount or 0) == 1

    def retire_all_but(self, key_id: str, *, now: datetime) -> list[str]:
        """Retire every key but `key_id` (after a new key was made); the ids retired."""
        with self._db.write() as conn:
            retired = conn.execute(
                update(signing_keys)
                .where(signing_keys.c.id != key_id, signing_keys.c.retired_at.is_(None))
                .values(retired_at=to_utc(now))
                .returning(signing_keys.c.id)
            ).all()
        return [str(row.id) for row in retired]
