"""Serving recordings: byte ranges, content types, readable file names, streamed ZIP export.

Nothing here holds a whole file in memory: audio is read in chunks from storage, and the
ZIP export is written by ``zipfile`` into a sink that the response drains after every
chunk, so an export of a thousand recordings costs a few hundred kilobytes of memory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import mimetypes
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from callvault.index import RecordingRow
from callvault.index.audit import csv_safe_row
from callvault.storage import Storage

CHUNK = 64 * 1024
# ASCII digits only (str.isdigit and \d accept "²" and other digits int() refuses), and at
# most 19 of them: int() of a 5,000-digit number raises, and no file is 10**19 bytes long.
_RANGE_RE = re.compile(r"^bytes=([0-9]{0,19})-([0-9]{0,19})$", re.ASCII)
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9+._-]+")

MANIFEST_NAME = "manifest.csv"
MANIFEST_HEADER = (
    "file",
    "recording_id",
    "recording_name",
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


class RangeNotSatisfiable(ValueError):
    """The Range header names no byte of the file, or is not a byte range we serve."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The byte range asked for, None for the whole file, or RangeNotSatisfiable.

    Serves one range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``); several ranges, other
    units and malformed or unsatisfiable ranges are refused with 416.
    """
    if header is None:
        return None
    match = _RANGE_RE.match(header.strip())
    if match is None:
        raise RangeNotSatisfiable(header)
    first, last = match.groups()
    if first == "" and last == "":
        raise RangeNotSatisfiable(header)
    try:
        start_at = None if first == "" else int(first)
        last_at = None if last == "" else int(last)
    except ValueError:  # never expected after the pattern; still a bad Range, not a 500
        raise RangeNotSatisfiable(header) from None
    if start_at is None:
        assert last_at is not None
        if last_at == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return ByteRange(max(0, size - last_at), size - 1)
    end = size - 1 if last_at is None else min(last_at, size - 1)
    if start_at >= size or (last_at is not None and last_at < start_at):
        raise RangeNotSatisfiable(header)
    return ByteRange(start_at, end)


def sniff_content_type(head: bytes, name: str) -> str:
    """The audio type from the file's first bytes, else from its name."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    if head[:4] == b"OggS":
        return "audio/ogg"
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def content_type_of(row: RecordingRow, storage: Storage) -> str:
    if row.content_type:
        return row.content_type
    assert row.storage_key is not None
    with storage.open(row.storage_key) as stream:
        head = stream.read(16)
    return sniff_content_type(head, row.name)


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


def content_disposition(filename: str, *, inline: bool = False) -> str:
    kind = "inline" if inline else "attachment"
    ascii_name = _UNSAFE_FILENAME.sub("-", filename)
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{ascii_name}"


def iter_file(stream: BinaryIO, length: int) -> Iterator[bytes]:
    """`length` bytes of `stream` (opened where they start), in chunks; closes the stream
    at the end."""
    try:
        remaining = length
        while remaining > 0:
            chunk = stream.read(min(CHUNK, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk
    finally:
        stream.close()


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


def _zip_time(row: RecordingRow) -> tuple[int, int, int, int, int, int]:
    when = row.start_at or row.archived_at or datetime(1980, 1, 1, tzinfo=UTC)
    when = max(when.astimezone(UTC), datetime(1980, 1, 1, tzinfo=UTC))
    return (when.year, when.month, when.day, when.hour, when.minute, when.second)


def stream_zip(
    rows: Sequence[RecordingRow],
    storage: Storage,
    *,
    on_done: Callable[[int, int], None] | None = None,
) -> Iterator[bytes]:
    """A ZIP of the rows' audio and a CSV manifest, yielded chunk by chunk.

    Each file is hashed as it is streamed; the manifest (written last) gives that SHA-256,
    the one the index holds and whether they match. A recording whose file cannot be read
    is listed in the manifest with an empty hash. `on_done(files, bytes)` runs at the end.
    """
    sink = _Sink()
    archive = zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED)
    manifest = io.StringIO()
    writer = csv.writer(manifest)
    writer.writerow(MANIFEST_HEADER)
    used: set[str] = set()
    files = 0
    total = 0
    for row in rows:
        filename = readable_filename(row)
        if filename in used:
            stem, dot, ext = filename.rpartition(".")
            filename = f"{stem}_{row.id}.{ext}" if dot else f"{filename}_{row.id}"
        used.add(filename)
        digest = hashlib.sha256()
        size = 0
        try:
            assert row.storage_key is not None
            stream = storage.open(row.storage_key)
        except (AssertionError, OSError, ValueError):
            stream = None
        if stream is not None:
            info = zipfile.ZipInfo(f"recordings/{filename}", date_time=_zip_time(row))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = row.size or 0
            large = (row.size or 0) >= zipfile.ZIP64_LIMIT
            with stream, archive.open(info, mode="w", force_zip64=large) as entry:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    entry.write(chunk)
                    if pending := sink.drain():
                        yield pending
            files += 1
            total += size
        actual = digest.hexdigest() if stream is not None else ""
        writer.writerow(
            csv_safe_row(
                (
                    f"recordings/{filename}" if stream is not None else "",
                    row.id,
                    row.name,
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
    manifest_info = zipfile.ZipInfo(MANIFEST_NAME, date_time=_now_zip_time())
    manifest_info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(manifest_info, manifest.getvalue().encode("utf-8"))
    archive.close()
    yield sink.drain()
    if on_done is not None:
        on_done(files, total)


def _now_zip_time() -> tuple[int, int, int, int, int, int]:
    now = datetime.now(UTC)
    return (now.year, now.month, now.day, now.hour, now.minute, now.second)
