"""`index.pbxs`: the registry of PBXs (rules and data in `callvault.index.pbxs`)."""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from callvault.index._db import Database
from callvault.index.pbxs import (
    CONFIG_FIELDS,
    FLAGS_PBX_ID,
    NoSuchPbx,
    PbxConfig,
    PbxInUse,
    PbxRecord,
    PbxRegistryError,
    check_config,
    unknown_pbx,
    validate_name,
)
from callvault.index.schema import calls, column_length, pbxs
from callvault.times import as_utc, to_utc

_SERIAL_MAX = column_length(pbxs.c.serial)


class PbxStore:
    """Rows of `pbxs`, as `PbxRecord`s; each method one transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
        self,
        name: str,
        config: PbxConfig,
        *,
        password_sealed: str,
        events_path: str,
        now: datetime,
    ) -> PbxRecord:
        """Register a PBX; PbxRegistryError for a bad name or setting or a name taken."""
        validate_name(name)
        config = check_config(config)
        now = to_utc(now)
        with self._db.write() as conn:
            if conn.execute(select(pbxs.c.id).where(pbxs.c.name == name)).first() is not None:
                raise PbxRegistryError(
                    f"a PBX named {name!r} is registered already: change it with "
                    f"`callvault pbx edit {name} ...`"
                )
            conn.execute(
                insert(pbxs).values(
                    name=name,
                    **_config_columns(config),
                    password_sealed=password_sealed,
                    events_path=events_path,
                    serial="",
                    detail="{}",
                    created_at=now,
                    updated_at=now,
                )
            )
            row = conn.execute(select(pbxs).where(pbxs.c.name == name)).one()
        return _record(row)

    def get(self, name: str) -> PbxRecord | None:
        with self._db.read() as conn:
            row = conn.execute(select(pbxs).where(pbxs.c.name == name)).first()
        return None if row is None else _record(row)

    def require(self, name: str) -> PbxRecord:
        """The PBX named `name`, or NoSuchPbx saying which ones there are."""
        found = self.get(name)
        if found is None:
            with self._db.read() as conn:
                raise _no_such(conn, name)
        return found

    def list(self) -> builtins.list[PbxRecord]:
        """Every registered PBX, by name."""
        with self._db.read() as conn:
            rows = conn.execute(select(pbxs).order_by(pbxs.c.name)).all()
        return [_record(row) for row in rows]

    def update(
        self,
        name: str,
        changes: Mapping[str, Any],
        *,
        password_sealed: str | None = None,
        now: datetime,
    ) -> PbxRecord:
        """Change the `PbxConfig` fields in `changes` (and the sealed password if given);
        the result is checked as a whole (e.g. one way of trusting the certificate). A PBX
        that is not (or no longer) P-Series keeps no webhook secret. NoSuchPbx or
        PbxRegistryError."""
        unknown = set(changes) - set(CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"not PBX settings: {sorted(unknown)}")
        with self._db.write() as conn:
            row = conn.execute(select(pbxs).where(pbxs.c.name == name)).first()
            if row is None:
                raise _no_such(conn, name)
            current = _record(row).config
            merged = check_config(
                PbxConfig(**{f: changes.get(f, getattr(current, f)) for f in CONFIG_FIELDS})
            )
            values: dict[str, Any] = {**_config_columns(merged), "updated_at": to_utc(now)}
            if password_sealed is not None:
                values["password_sealed"] = password_sealed
            if merged.kind != "p-series":  # only a P-Series PBX signs webhooks
                values["webhook_secret_sealed"] = None
            conn.execute(update(pbxs).where(pbxs.c.name == name).values(**values))
            row = conn.execute(select(pbxs).where(pbxs.c.name == name)).one()
        return _record(row)

    def given_at_start(self, config: PbxConfig, *, events_path: str, now: datetime) -> PbxRecord:
        """The registry entry of the archive's PBX that `serve` or `backfill` was given by
        its flags (the one-PBX shorthand): always the entry with id `FLAGS_PBX_ID` (0),
        under which calls recorded without a registry are kept too. Made if missing (named
        ``main``, or ``main-2``... if that name is taken, with `events_path`), and given the
        flags' settings; its password stays out of the index (given at each start).

        PbxRegistryError if another entry has the flags' URL: that PBX is registered, and
        its calls recorded under the flags' entry too would be archived twice.
        """
        config = check_config(config)
        now = to_utc(now)
        with self._db.write() as conn:
            other = conn.execute(
                select(pbxs.c.name).where(pbxs.c.url == config.url, pbxs.c.id != FLAGS_PBX_ID)
            ).first()
            if other is not None:
                raise PbxRegistryError(
                    f"PBX {other[0]} is registered with the URL {config.url}: name it with "
                    f"--only {other[0]} instead of giving --pbx"
                )
            row = conn.execute(select(pbxs).where(pbxs.c.id == FLAGS_PBX_ID)).first()
            if row is None:
                taken = set(conn.execute(select(pbxs.c.name)).scalars())
                name = next(
                    candidate
                    for candidate in ("main", *(f"main-{n}" for n in range(2, 10_000)))
                    if candidate not in taken
                )
                conn.execute(
                    insert(pbxs).values(
                        id=FLAGS_PBX_ID,
                        name=name,
                        **_config_columns(config),
                        password_sealed="",
                        events_path=events_path,
                        serial="",
                        detail="{}",
                        created_at=now,
                        updated_at=now,
                    )
                )
            elif _record(row).config != config:
                conn.execute(
                    update(pbxs)
                    .where(pbxs.c.id == FLAGS_PBX_ID)
                    .values(**_config_columns(config), updated_at=now)
                )
            row = conn.execute(select(pbxs).where(pbxs.c.id == FLAGS_PBX_ID)).one()
        return _record(row)

    def record_test(self, name: str, detail: Mapping[str, Any], *, now: datetime) -> None:
        """Keep what a test of the PBX found (JSON-able), for `pbx show` and the web app."""
        with self._db.write() as conn:
            conn.execute(
                update(pbxs)
                .where(pbxs.c.name == name)
                .values(detail=json.dumps(dict(detail), sort_keys=True), updated_at=to_utc(now))
            )

    def report_session(self, pbx_id: int, health: str) -> None:
        """Keep the PBX session's health (JSON, as `serve` reports it) in its entry; the
        entry's `updated_at` is left alone (it says when a person changed it)."""
        with self._db.write() as conn:
            conn.execute(update(pbxs).where(pbxs.c.id == pbx_id).values(session=health))

    def save_tokens(self, pbx_id: int, sealed: str | None) -> None:
        """Keep a P-Series PBX's live tokens, sealed by the caller (None: there are none).
        Its `updated_at` is left alone: no person changed anything."""
        with self._db.write() as conn:
            conn.execute(update(pbxs).where(pbxs.c.id == pbx_id).values(tokens_sealed=sealed))

    def load_tokens(self, pbx_id: int) -> str | None:
        """The PBX's sealed tokens as last kept, or None."""
        with self._db.read() as conn:
            value = conn.execute(
                select(pbxs.c.tokens_sealed).where(pbxs.c.id == pbx_id)
            ).scalar_one_or_none()
        return None if value is None else str(value)

    def set_webhook_secret(self, name: str, sealed: str | None, *, now: datetime) -> PbxRecord:
        """Keep a P-Series PBX's webhook secret, sealed by the caller (None: none, its
        webhooks are refused); the record after. NoSuchPbx; PbxRegistryError for a PBX of
        another kind (only the P-Series signs webhooks). Its revision changes with it, so a
        running serve takes the new secret."""
        with self._db.write() as conn:
            row = conn.execute(select(pbxs).where(pbxs.c.name == name)).first()
            if row is None:
                raise _no_such(conn, name)
            kind = str(row._mapping["kind"])
            if sealed is not None and kind != "p-series":
                raise PbxRegistryError(
                    f"--webhook-secret-env: PBX {name} is {kind}: only a P-Series PBX pushes "
                    "webhooks"
                )
            conn.execute(
                update(pbxs)
                .where(pbxs.c.name == name)
                .values(webhook_secret_sealed=sealed, updated_at=to_utc(now))
            )
            row = conn.execute(select(pbxs).where(pbxs.c.name == name)).one()
        return _record(row)

    def learn_serial(self, name: str, serial: str, *, now: datetime) -> None:
        """Remember the serial the PBX's reports name it by (when it differs)."""
        serial = serial.strip()[:_SERIAL_MAX]
        if not serial:
            return
        with self._db.write() as conn:
            conn.execute(
                update(pbxs)
                .where(pbxs.c.name == name, pbxs.c.serial != serial)
                .values(serial=serial, updated_at=to_utc(now))
            )

    def remove(self, name: str) -> PbxRecord:
        """Take a PBX off the registry; the removed record. NoSuchPbx, or PbxInUse when
        calls of it are archived (they are known by it: taken off, its next calls would be
        another PBX's, and the call history read again would archive its recordings twice).
        """
        with self._db.write() as conn:
            row = conn.execute(select(pbxs).where(pbxs.c.name == name)).first()
            if row is None:
                raise _no_such(conn, name)
            pbx_id = row._mapping["id"]
            if conn.execute(select(calls.c.id).where(calls.c.pbx_id == pbx_id).limit(1)).first():
                raise PbxInUse(
                    f"PBX {name!r} cannot be taken off the registry: calls of it are "
                    "archived, and are known by it; to stop archiving it, name the PBXs "
                    "serve archives with --only"
                )
            conn.execute(delete(pbxs).where(pbxs.c.name == name))
        return _record(row)


def _config_columns(config: PbxConfig) -> dict[str, Any]:
    return {
        "kind": config.kind,
        "url": config.url,
        "username": config.username,
        "api_version": config.api_version,
        "ca_file": config.ca_file,
        "pin_sha256": config.pin_sha256,
        "insecure": config.insecure,
        "tls_min_version": config.tls_min_version,
        "timezone": config.timezone,
        "max_downloads": config.max_downloads,
        "events_allow": ",".join(config.events_allow),
        "report_url": config.report_url,
        "tcp_report_port": config.tcp_report_port,
    }


def _record(row: Row[Any]) -> PbxRecord:
    m = row._mapping
    detail, session = _json_object(m["detail"]), _json_object(m["session"])
    return PbxRecord(
        id=int(m["id"]),
        name=str(m["name"]),
        config=PbxConfig(
            url=str(m["url"]),
            username=str(m["username"]),
            api_version=str(m["api_version"]),
            ca_file=m["ca_file"],
            pin_sha256=m["pin_sha256"],
            insecure=bool(m["insecure"]),
            tls_min_version=str(m["tls_min_version"]),
            timezone=m["timezone"],
            max_downloads=int(m["max_downloads"]),
            events_allow=tuple(e for e in str(m["events_allow"]).split(",") if e),
            report_url=m["report_url"],
            tcp_report_port=m["tcp_report_port"],
            kind=str(m["kind"]),
        ),
        password_sealed=str(m["password_sealed"]),
        events_path=str(m["events_path"]),
        serial=str(m["serial"]),
        detail=detail,
        created_at=_when(m["created_at"]),
        updated_at=_when(m["updated_at"]),
        session=session,
        webhook_secret_sealed=(
            None if m["webhook_secret_sealed"] is None else str(m["webhook_secret_sealed"])
        ),
    )


def _json_object(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _when(value: datetime) -> datetime:
    moment = as_utc(value)
    assert moment is not None  # the columns are NOT NULL
    return moment


def _no_such(conn: Connection, name: str) -> NoSuchPbx:
    """NoSuchPbx for `name`, saying which PBXs there are."""
    return NoSuchPbx(unknown_pbx(name, conn.execute(select(pbxs.c.name)).scalars()))
