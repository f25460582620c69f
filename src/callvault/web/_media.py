"""Serving recordings: byte ranges, content types, download names.

Nothing here holds a whole file in memory: audio is read in chunks from storage. (The
ZIP export, signed, is `callvault.ops.stream_export`.)
"""

from __future__ import annotations

import itertools
import mimetypes
import re
from collections.abc import Iterator
from dataclasses import dataclass

from callvault.index import RecordingRow
from callvault.keys import Keyring
from callvault.ops import read_head, safe_filename
from callvault.storage import Storage

CHUNK = 64 * 1024
# ASCII digits only (str.isdigit and \d accept "²" and other digits int() refuses), and at
# most 19 of them: int() of a 5,000-digit number raises, and no file is 10**19 bytes long.
_RANGE_RE = re.compile(r"^bytes=([0-9]{0,19})-([0-9]{0,19})$", re.ASCII)


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


def content_type_of(row: RecordingRow, storage: Storage, keyring: Keyring | None) -> str:
    """The recording's type as archived, else sniffed from its first (plaintext) bytes;
    RecordingUnreadable for an encrypted one that cannot be read."""
    if row.content_type:
        return row.content_type
    return sniff_content_type(read_head(storage, row, keyring, 16), row.name)


def checked_first(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """`chunks` with its first chunk read now: an encrypted recording's key and first
    segment are checked before a response is committed to (its errors raise here)."""
    try:
        first = next(chunks)
    except StopIteration:
        return iter(())
    return itertools.chain((first,), chunks)


def content_disposition(filename: str, *, inline: bool = False) -> str:
    kind = "inline" if inline else "attachment"
    ascii_name = safe_filename(filename)
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{ascii_name}"
