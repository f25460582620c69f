"""Signed ZIP exports of recordings, and their offline check (`callvault verify-export`).

An export is a ZIP (stored, not compressed: audio does not shrink) holding:

* ``recordings/<readable name>``: the audio, as archived;
* ``manifest.csv``: one line per recording: its file, id, name, PBX and its kind, the call's times,
  numbers, direction and status, its size and the SHA-256 of the bytes in the ZIP, the
  SHA-256 the index holds and whether they match;
* ``SHA256SUMS``: ``sha256sum`` lines (``<hex>  <path>``) for every file above, the
  manifest included, so ``sha256sum -c SHA256SUMS`` checks the lot;
* ``manifest.csv.sig`` and ``SHA256SUMS.sig``: Ed25519 signatures (64 raw bytes) of those
  two files by the deployment's signing key, which ``openssl pkeyutl -verify -pubin
  -inkey key.pem -rawin -in SHA256SUMS -sigfile SHA256SUMS.sig`` checks;
* ``signing-key.pem``: the public key that signed (for convenience: trust comes from
  comparing its fingerprint with the one the deployment publishes, or from
  ``--public-key``);
* ``README.txt``: how to check all of this with standard tools.

Without a signing key (no master key loaded where the export was made) the export has no
signatures and says so in its README; `verify_export` then reports it unsigned.

Nothing holds a whole file in memory: ``zipfile`` writes into a sink that the caller
drains after every chunk, so an export of a thousand recordings costs a few hundred
kilobytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from callvault.index import RecordingRow
from callvault.index.audit import csv_safe_row
from callvault.index.pbxs import PbxRecord
from callvault.keys import Keyring, PublicKey, SigningKey
from callvault.ops._audio import RecordingUnreadable, open_recording
from callvault.ops._json import JsonResult
from callvault.storage import Storage

CHUNK = 64 * 1024
log = logging.getLogger("callvault.ops")
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9+._-]+")

MANIFEST_NAME = "manifest.csv"
SUMS_NAME = "SHA256SUMS"
SIGNATURE_SUFFIX = ".sig"
KEY_NAME = "signing-key.pem"
README_NAME = "README.txt"
MANIFEST_HEADER = (
    "file",
    "recording_id",
    "recording_name",
    "pbx",
    "pbx_kind",
    "start_utc",
    "start_local",
    "from",
    "to",
    "did",
    "direction",
    "status",
    "talk_s",
    "size",
    "sha256",
    "index_sha256",
    "matches_index",
)

_README = """\
callvault export, made {made} UTC.

recordings/    the audio files, as archived
manifest.csv   one line per recording: its call, size and SHA-256
SHA256SUMS     the SHA-256 of every file here, manifest.csv included
{signed}
To check it with standard tools, in the unzipped folder:

  sha256sum -c SHA256SUMS
{openssl}
or with callvault, without its database: callvault verify-export EXPORT.zip --public-key KEY.pem
"""

_SIGNED = """\
*.sig          Ed25519 signatures of manifest.csv and SHA256SUMS by the deployment's key
signing-key.pem  that key (fingerprint sha256:{fingerprint}); compare the fingerprint
               with the one your callvault deployment publishes (`callvault keys show`)
"""

_OPENSSL = """\
  openssl pkeyutl -verify -pubin -inkey KEY.pem -rawin -in SHA256SUMS -sigfile SHA256SUMS.sig

(KEY.pem: the deployment's public key, as you obtained it from its operators; the
fingerprint of a key file: openssl pkey -pubin -in KEY.pem -outform DER | sha256sum)
"""


def _extension(name: str) -> str:
    dot = name.rfind(".")
    ext = name[dot:] if dot > 0 else ""
    return ext if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", ext) else ".wav"


def readable_filename(row: RecordingRow) -> str:
    """``2024-05-01_093015_1001_to_1003.wav``: the call's time, from and to."""
    when = ""
    if row.timestart_local:
        when = row.timestart_local.replace(" ", "_").replace(":", "")
    elif row.start_at is not None:
        when = row.start_at.astimezone(UTC).strftime("%Y-%m-%d_%H%M%SZ")
    parts = [p for p in (when, row.call_from or "unknown", "to", row.call_to or "unknown") if p]
    stem = _UNSAFE_FILENAME.sub("-", "_".join(parts)).strip("-_.") or f"recording-{row.id}"
    return stem[:150] + _extension(row.name)


def safe_filename(filename: str) -> str:
    """`filename` with anything but letters, digits and ``+._-`` made a dash."""
    return _UNSAFE_FILENAME.sub("-", filename)


class _Sink(io.RawIOBase):
    """A write-only, unseekable stream that collects what zipfile writes until drained."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        chunk = bytes(data)  # type: ignore[call-overload]
        self._chunks.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def drain(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def _zip_time(when: datetime) -> tuple[int, int, int, int, int, int]:
    when = max(when.astimezone(UTC), datetime(1980, 1, 1, tzinfo=UTC))
    return (when.year, when.month, when.day, when.hour, when.minute, when.second)


def stream_export(
    rows: Sequence[RecordingRow],
    storage: Storage,
    *,
    registry: Sequence[PbxRecord] = (),
    key: SigningKey | None = None,
    now: datetime | None = None,
    on_done: Callable[[int, int], None] | None = None,
    keyring: Keyring | None = None,
) -> Iterator[bytes]:
    """The export of `rows` (see the module docstring), yielded chunk by chunk, signed with
    `key` if given; each row's PBX is named, with its kind, from `registry` (the PBXs of
    the index, read once by the caller). Each file is hashed as it is streamed; encrypted
    recordings are decrypted with `keyring` (the ZIP holds the audio as the PBX sent it).
    A recording whose file cannot be read (missing, or encrypted and its key or first
    segment does not open) is listed in the manifest with an empty file and hash and
    ``matches_index`` no; one whose later segment fails to authenticate ends where it
    failed, and the manifest gives the size and hash of what the ZIP holds,
    ``matches_index`` no. `on_done(files, bytes)` runs at the end."""
    made = now or datetime.now(UTC)
    pbx_names = {record.id: record.name for record in registry}
    pbx_kinds = {record.id: record.config.kind for record in registry}
    sink = _Sink()
    archive = zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED)
    manifest = io.StringIO(newline="")
    writer = csv.writer(manifest)
    writer.writerow(MANIFEST_HEADER)
    sums: list[str] = []
    used: set[str] = set()
    files = total = 0
    for row in rows:
        filename = readable_filename(row)
        if filename in used:
            stem, dot, ext = filename.rpartition(".")
            filename = f"{stem}_{row.id}.{ext}" if dot else f"{filename}_{row.id}"
        used.add(filename)
        path = f"recordings/{filename}"
        digest = hashlib.sha256()
        size = 0
        stream: Iterator[bytes] | None
        try:
            chunks = open_recording(storage, row, keyring)
            first = next(chunks, b"")  # an encrypted file's key and first segment checked
            stream = itertools.chain((first,), chunks)
        except (RecordingUnreadable, OSError, ValueError) as exc:
            log.error("export: recording %d left out: %s", row.id, exc)
            stream = None
        if stream is not None:
            info = zipfile.ZipInfo(path, date_time=_zip_time(row.start_at or made))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = row.size or 0
            large = (row.size or 0) >= zipfile.ZIP64_LIMIT
            with archive.open(info, mode="w", force_zip64=large) as entry:
                try:
                    for chunk in stream:
                        digest.update(chunk)
                        size += len(chunk)
                        entry.write(chunk)
                        if pending := sink.drain():
                            yield pending
                except (RecordingUnreadable, OSError) as exc:
                    log.error("export: recording %d cut short: %s", row.id, exc)
            files += 1
            total += size
            sums.append(f"{digest.hexdigest()}  {path}\n")
        actual = digest.hexdigest() if stream is not None else ""
        writer.writerow(
            csv_safe_row(
                (
                    path if stream is not None else "",
                    row.id,
                    row.name,
                    pbx_names.get(row.pbx_id, str(row.pbx_id)),
                    pbx_kinds.get(row.pbx_id, ""),
                    row.start_at.astimezone(UTC).isoformat() if row.start_at else "",
                    row.timestart_local,
                    row.call_from,
                    row.call_to,
                    row.did,
                    row.direction,
                    row.status,
                    "" if row.talk_s is None else row.talk_s,
                    size if stream is not None else "",
                    actual,
                    row.sha256 or "",
                    "yes" if stream is not None and actual == row.sha256 else "no",
                )
            )
        )
        if pending := sink.drain():
            yield pending
    manifest_bytes = manifest.getvalue().encode("utf-8")
    sums.append(f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST_NAME}\n")
    sums_bytes = "".join(sums).encode("utf-8")
    members: list[tuple[str, bytes]] = [(MANIFEST_NAME, manifest_bytes), (SUMS_NAME, sums_bytes)]
    if key is not None:
        members += [
            (MANIFEST_NAME + SIGNATURE_SUFFIX, key.sign(manifest_bytes)),
            (SUMS_NAME + SIGNATURE_SUFFIX, key.sign(sums_bytes)),
            (KEY_NAME, key.public.pem().encode("ascii")),
        ]
    signed = (
        _SIGNED.format(fingerprint=key.public.fingerprint)
        if key is not None
        else ("(not signed: the deployment that made it had no signing key loaded)\n")
    )
    readme = _README.format(
        made=f"{made.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
        signed=signed,
        openssl=_OPENSSL if key is not None else "",
    )
    members.append((README_NAME, readme.encode("utf-8")))
    for name, data in members:
        info = zipfile.ZipInfo(name, date_time=_zip_time(made))
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, data)
    archive.close()
    yield sink.drain()
    if on_done is not None:
        on_done(files, total)


@dataclass(frozen=True, slots=True)
class ExportVerification(JsonResult):
    """What `verify_export` found; `ok` when every file, the manifest and the signatures
    hold (and, when a key was given, it is the key that signed)."""

    path: str
    recordings: int  # manifest lines
    files_checked: int
    signed: bool
    key_id: str | None  # the key that signed (as checked)
    key_fingerprint: str | None
    key_trusted: bool  # checked against a key given from outside the export
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.signed

    def summary(self) -> str:
        if self.problems:
            more = (
                f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            )
            return f"{self.path}: NOT intact: {self.problems[0]}{more}"
        if not self.signed:
            return (
                f"{self.path}: {self.files_checked} files match SHA256SUMS, but the export is "
                "not signed: nothing shows who made it"
            )
        whose = (
            "the key you gave"
            if self.key_trusted
            else f"the key inside it (fingerprint sha256:{self.key_fingerprint}: compare "
            "it with the one your deployment publishes, or pass --public-key)"
        )
        return (
            f"{self.path}: intact: {self.recordings} recordings, {self.files_checked} files, "
            f"manifest and checksums signed by {whose}"
        )


class ExportError(ValueError):
    """The file is not an export that can be checked at all (one line)."""


def verify_export(path: Path, *, trusted: PublicKey | None = None) -> ExportVerification:
    """Check an export offline: every file against SHA256SUMS and the manifest, nothing
    added or missing, and both signed files against their signatures (by `trusted` if
    given, else by the key inside the export). ExportError if it is not a ZIP at all."""
    try:
        bundle = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ExportError(f"{path} is not a ZIP file ({exc})") from None
    problems: list[str] = []
    with bundle:
        names = [info.filename for info in bundle.infolist() if not info.is_dir()]
        if MANIFEST_NAME not in names or SUMS_NAME not in names:
            raise ExportError(
                f"{path} is not a callvault export (it has no {MANIFEST_NAME} and {SUMS_NAME})"
            )
        manifest = bundle.read(MANIFEST_NAME)
        sums = bundle.read(SUMS_NAME)
        signer_key, signed, trusted_ok = _check_signatures(bundle, names, manifest, sums, trusted)
        problems += signed
        listed = _parse_sums(sums, problems)
        rows = _parse_manifest(manifest, problems)
        for name, expected in listed.items():
            if name not in names:
                problems.append(f"{name} is listed in {SUMS_NAME} but missing from the export")
                continue
            if _sha256_of(bundle, name) != expected:
                problems.append(f"{name} was changed: its SHA-256 is not the one in {SUMS_NAME}")
        extra = {
            name
            for name in names
            if name not in listed
            and name not in (SUMS_NAME, README_NAME, KEY_NAME)
            and not name.endswith(SIGNATURE_SUFFIX)
        }
        problems += [f"{name} was added: no checksum lists it" for name in sorted(extra)]
        for row in rows:
            file, digest = row.get("file", ""), row.get("sha256", "")
            if file and listed.get(file) != digest:
                problems.append(f"{file}: the manifest and {SUMS_NAME} disagree on its SHA-256")
        for name in listed:
            if name != MANIFEST_NAME and name not in {row.get("file") for row in rows}:
                problems.append(f"{name} is not in the manifest")
    return ExportVerification(
        path=str(path),
        recordings=len(rows),
        files_checked=len([name for name in listed if name in names]),
        signed=signer_key is not None,
        key_id=None if signer_key is None else signer_key.id,
        key_fingerprint=None if signer_key is None else signer_key.fingerprint,
        key_trusted=trusted_ok,
        problems=problems,
    )


def _check_signatures(
    bundle: zipfile.ZipFile,
    names: list[str],
    manifest: bytes,
    sums: bytes,
    trusted: PublicKey | None,
) -> tuple[PublicKey | None, list[str], bool]:
    """(the key that signed, problems, whether it is the trusted key)."""
    signatures = [MANIFEST_NAME + SIGNATURE_SUFFIX, SUMS_NAME + SIGNATURE_SUFFIX]
    if not any(name in names for name in signatures):
        return None, (["it is not signed, and a key was given"] if trusted else []), False
    problems: list[str] = []
    key = trusted
    if key is None:
        if KEY_NAME not in names:
            return None, [f"it is signed but holds no {KEY_NAME}: give --public-key"], False
        try:
            key = PublicKey.from_pem(
                bundle.read(KEY_NAME).decode("ascii", "replace"), where=KEY_NAME
            )
        except ValueError as exc:
            return None, [str(exc)], False
    for name, data in zip(signatures, (manifest, sums), strict=True):
        if name not in names:
            problems.append(f"{name} is missing: the export was altered")
        elif not key.verify(bundle.read(name), data):
            whose = "the key you gave" if trusted else "the key inside the export"
            problems.append(
                f"{name.removesuffix(SIGNATURE_SUFFIX)} does not match its signature by {whose}: "
                "it was altered, or signed by another key"
            )
    return key, problems, trusted is not None


def _parse_sums(sums: bytes, problems: list[str]) -> dict[str, str]:
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.decode("utf-8", "replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
            problems.append(f"{SUMS_NAME} line {number} is not '<sha256>  <file>'")
            continue
        listed[name] = digest
    return listed


def _parse_manifest(manifest: bytes, problems: list[str]) -> list[dict[str, str]]:
    try:
        reader = csv.DictReader(io.StringIO(manifest.decode("utf-8"), newline=""))
        return list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{MANIFEST_NAME} cannot be read ({exc})")
        return []


def _sha256_of(bundle: zipfile.ZipFile, name: str) -> str:
    digest = hashlib.sha256()
    try:
        with bundle.open(name) as member:
            while chunk := member.read(CHUNK):
                digest.update(chunk)
    except (zipfile.BadZipFile, OSError):
        return ""  # (a damaged member: reported as changed)
    return digest.hexdigest()
