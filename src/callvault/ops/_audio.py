"""Reading a recording's bytes: the one home of "decrypt if it is encrypted".

A recording archived with encryption at rest on (``serve --encrypt``) is stored in the
format of `callvault.cipher` under its own data key, which its index row keeps sealed with
the master keyring (`RecordingRow.data_key`, context ``recording:<id>``); the file's
associated data is ``callvault recording <id>``, so a file moved onto another recording
does not open. A row without a data key is stored in clear and passes through.

Everything that reads a recording's audio goes through here: the web app's audio endpoint
(whole and Range) and its content-type sniffing, `verify_recording`, `stream_export`.

* `recording_size`: the plaintext size (from the stored file's size, without reading it);
* `read_recording_range`: plaintext bytes [start, start + length), reading only the
  header and the segments they lie in (one ranged read of the store, two when the range
  does not start in the first segment);
* `open_recording`: the whole plaintext, in order, every segment authenticated as read
  (the final segment first: a file cut short fails before its first byte is given).

Failures are `RecordingUnreadable` with one line for a person (a missing or wrong master
key, a segment that does not authenticate, a file of an impossible size); key material is
never part of a message. `reason` says which: ``key`` (the keys loaded cannot open the
data key: fix the configuration) or ``damaged`` (the stored bytes are wrong).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from callvault import cipher
from callvault.index import RecordingRow
from callvault.keys import Keyring, MasterKeyError, recording_context
from callvault.storage import Storage

KEY = "key"
DAMAGED = "damaged"


class RecordingUnreadable(Exception):
    """A recording that cannot be read: one line for a person; `reason` is `KEY` (no
    master key, or not the one it was sealed with) or `DAMAGED` (the stored file was
    altered, truncated, reordered or moved)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def data_key_context(recording_id: int) -> str:
    """The context a recording's data key is sealed under (`Keyring.seal`)."""
    return recording_context(recording_id)


def associated_data(recording_id: int) -> bytes:
    """The associated data of a recording's encrypted file (see `callvault.cipher`)."""
    return cipher.recording_associated_data(recording_id)


def open_data_key(row: RecordingRow, keyring: Keyring | None) -> bytes:
    """The recording's data key; RecordingUnreadable(KEY) if it cannot be opened."""
    assert row.data_key is not None
    if keyring is None:
        raise RecordingUnreadable(
            f"recording {row.id} is encrypted and no master key is loaded (set "
            "CALLVAULT_MASTER_KEY or master_key_file)",
            KEY,
        )
    try:
        return keyring.open(row.data_key, data_key_context(row.id))
    except MasterKeyError as exc:
        raise RecordingUnreadable(f"recording {row.id}: its data key: {exc}", KEY) from None


def _key(row: RecordingRow) -> str:
    if row.storage_key is None:
        raise FileNotFoundError(f"recording {row.id} has no stored file")
    return row.storage_key


def _ciphertext_size(storage: Storage, row: RecordingRow) -> int:
    stored = storage.stat(_key(row))
    if stored is None:
        raise FileNotFoundError(f"the file of recording {row.id} is missing from storage")
    return stored.size


def recording_size(storage: Storage, row: RecordingRow) -> int:
    """The recording's size as played (the plaintext's); FileNotFoundError if the file is
    missing, RecordingUnreadable(DAMAGED) if no encrypted file has its size."""
    size = _ciphertext_size(storage, row)
    if row.data_key is None:
        return size
    try:
        return cipher.plaintext_size(size)
    except cipher.CipherError as exc:
        raise RecordingUnreadable(f"recording {row.id}: {exc}", DAMAGED) from None


def _read_exactly(stream: BinaryIO, length: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        chunk = stream.read(length)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
    return b"".join(parts)


class _SpanReader:
    """`read_at` for `cipher.read_range` over one stored object: the header and then the
    contiguous span of segments, each fetched with one ranged read of the store."""

    def __init__(self, storage: Storage, key: str, offset: int, length: int) -> None:
        self._storage = storage
        self._key = key
        # A span starting at the first segment starts right after the header: read both.
        self._start = 0 if offset <= cipher.HEADER_SIZE else offset
        self._end = offset + length
        self._position = self._start
        self._stream: BinaryIO | None = None

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < self._start or offset != self._position:  # the header, on its own
            with self._storage.open_range(self._key, offset, length) as stream:
                return _read_exactly(stream, length)
        if self._stream is None:
            self._stream = self._storage.open_range(self._key, self._start, self._end - self._start)
        data = _read_exactly(self._stream, length)
        self._position += len(data)
        return data

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _plain_chunks(stream: BinaryIO, length: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    try:
        while length > 0:
            data = stream.read(min(chunk, length))
            if not data:
                return
            length -= len(data)
            yield data
    finally:
        stream.close()


def _checked(row: RecordingRow, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """`chunks`, a CipherError met while reading made a RecordingUnreadable(DAMAGED)."""
    try:
        yield from chunks
    except cipher.CipherError as exc:
        raise RecordingUnreadable(f"recording {row.id}: {exc}", DAMAGED) from None


def read_recording_range(
    storage: Storage, row: RecordingRow, keyring: Keyring | None, start: int, length: int
) -> Iterator[bytes]:
    """Plaintext bytes [start, start + length) of the recording (clamped to its end).

    The data key is opened and the size checked on the call (RecordingUnreadable,
    FileNotFoundError); the segments are read and authenticated as the iterator is
    consumed, so take its first chunk before committing to a response.
    """
    key = _key(row)
    if row.data_key is None:
        return _plain_chunks(storage.open_range(key, start, length), length)
    data_key = open_data_key(row, keyring)
    size = _ciphertext_size(storage, row)
    try:
        offset, span = cipher.ciphertext_span(start, start + length, size)
    except cipher.CipherError as exc:
        raise RecordingUnreadable(f"recording {row.id}: {exc}", DAMAGED) from None
    if span == 0:
        return iter(())
    reader = _SpanReader(storage, key, offset, span)

    def chunks() -> Iterator[bytes]:
        try:
            yield from cipher.read_range(
                data_key, reader.read_at, size, start, start + length, associated_data(row.id)
            )
        finally:
            reader.close()

    return _checked(row, chunks())


def open_recording(storage: Storage, row: RecordingRow, keyring: Keyring | None) -> Iterator[bytes]:
    """The whole plaintext of the recording, in chunks, read through once (every segment
    authenticated before its bytes are given). Errors as `read_recording_range`."""
    key = _key(row)
    if row.data_key is None:
        stream = storage.open(key)
        return _plain_chunks(stream, 1 << 62)
    data_key = open_data_key(row, keyring)
    size = _ciphertext_size(storage, row)
    try:
        plain_size = cipher.plaintext_size(size)
    except cipher.CipherError as exc:
        raise RecordingUnreadable(f"recording {row.id}: {exc}", DAMAGED) from None

    def chunks() -> Iterator[bytes]:
        # The final segment first (one small ranged read): it authenticates the end of
        # the file, so a file cut short fails before anything is given, not halfway.
        if plain_size > cipher.SEGMENT_SIZE - cipher.HEADER_SIZE - cipher.TAG_BYTES:
            for _ in read_recording_range(storage, row, keyring, plain_size - 1, 1):
                pass
        stream = storage.open(key)
        try:
            yield from cipher.decrypt_file(data_key, stream, size, associated_data(row.id))
        finally:
            stream.close()

    return _checked(row, chunks())


def read_head(storage: Storage, row: RecordingRow, keyring: Keyring | None, length: int) -> bytes:
    """The first `length` bytes of the plaintext (for sniffing its type)."""
    return b"".join(read_recording_range(storage, row, keyring, 0, length))
