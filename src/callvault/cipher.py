"""Encryption of recordings at rest, in a format that allows random access to the plaintext.

Each recording is encrypted with its own random 32-byte *data key* (`new_data_key`). The
file format is Tink's streaming AEAD ``AesGcmHkdfStreaming`` (the wire format of Tink's
``AesGcmHkdfStreamingKey``; Tink ciphertexts decrypt here and ours decrypt in Tink) with
these parameters, which Tink's keys record but the files do not:

* key size (Tink's ``key_size``, the data key): 32 bytes;
* HKDF hash (``hkdf_hash_type``): SHA-256;
* derived key size (``derived_key_size``): 32 bytes, so each file is sealed with AES-256-GCM;
* ciphertext segment size (``ciphertext_segment_size``): `SEGMENT_SIZE` = 65536 bytes;
* first segment offset (Tink's "ciphertext offset" beyond the header): 0.

In Tink, such a file opens with a keyset of one ``AesGcmHkdfStreamingKey`` whose
``key_value`` is the data key, with the parameters above and output prefix type RAW.

Tink's own templates use 4 KiB or 1 MiB segments; 64 KiB is in between on purpose. A range
needs at most two partial segments, so a seek reads and decrypts at most ~128 KiB beyond the
bytes asked for (1 MiB segments: ~2 MiB). Per segment, Python's per-call overhead is small
next to the AES-GCM work (4 KiB segments are dominated by it), and a segment still fits the
CPU caches: measured on 2 cores, 64 KiB segments decrypt at ~3.5 GB/s, 4 KiB and 1 MiB ones
at ~1.4 GB/s. The 16-byte tag adds 0.025 %.

The format, in full (S = the ciphertext segment size; all sizes in bytes)::

    file    = header || segment_0 || segment_1 || ... || segment_(n-1)        (n >= 1)
    header  = header_length (1 byte, = 40) || salt (32) || nonce_prefix (7)

* ``salt`` and ``nonce_prefix`` are random for each file (``os.urandom``).
* The segment key is HKDF-SHA256 (RFC 5869) with input keying material = the data key,
  salt = ``salt``, info = the associated data (possibly empty), output length 32. The
  associated data is bound in only through this derivation; it is not stored in the file.
* Segment i is AES-256-GCM under the segment key with the 12-byte nonce
  ``nonce_prefix || i as 4 bytes big-endian || last`` where ``last`` is 0x01 for the final
  segment (i = n-1) and 0x00 for every other one; no per-segment associated data; the output
  is the ciphertext followed by the 16-byte tag.
* Plaintext segments: segment 0 holds S - 16 - 40 = 65480 bytes, every later segment S - 16
  = 65520 bytes, except the final one, which holds 0 to that many. So segment 0 plus the
  header fill exactly S bytes of file, and segment i (i >= 1) starts at file offset i * S.
* The writer cuts segments greedily and marks the final one: a plaintext that fills its last
  segment exactly ends with that full segment (marked last), never with an extra empty one;
  an empty plaintext is the header plus one segment of just a tag (56 bytes in all). A reader
  accepts a final empty segment after a full one too, as Tink does.
* The file size alone gives the layout: n = ceil(size / S), the final segment is what is left
  (at least 16 bytes; the whole file at least 56), and the plaintext size is
  size - 40 - 16 * n (`plaintext_size`). Segment numbers must fit in 4 bytes (n <= 2**32).

A plaintext byte at position x lies in segment ``(x + 40) // (S - 16)``, at offset
``(x + 40) % (S - 16)`` of that segment's plaintext, less 40 in segment 0. A plaintext
range [start, end) therefore needs the header and the segments from that of `start` to that
of ``end - 1``, which are contiguous in the file (`ciphertext_span`). Every segment read is
authenticated; the final segment must authenticate with the last flag set, so a file cut at
a segment boundary fails where it now ends (its final segment was not written as the last),
as does a file whose segments were reordered or taken from another file.

Errors are `CipherError`s: one line for a person, never any key material.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DATA_KEY_BYTES = 32
SEGMENT_SIZE = 65536
"""The ciphertext segment size (Tink's ``ciphertext_segment_size``) of callvault's files."""
SALT_BYTES = 32
NONCE_PREFIX_BYTES = 7
HEADER_SIZE = 1 + SALT_BYTES + NONCE_PREFIX_BYTES  # 40, also the header's first byte
TAG_BYTES = 16
READ_BATCH_SEGMENTS = 16
"""How many segments `read_range` asks `read_at` for at once, at most (~1 MiB)."""

_MAX_SEGMENTS = 2**32  # the segment number is 4 bytes in the nonce
_MIN_SEGMENT_SIZE = HEADER_SIZE + TAG_BYTES + 1  # Tink: more than derived key size + 24
_MAX_SEGMENT_SIZE = 2**31 - 1  # Tink's implementations hold it in a signed 32-bit int

_DAMAGED = "the file was altered, truncated or reordered, or the key or associated data is wrong"


class CipherError(ValueError):
    """A ciphertext that cannot be decrypted (or a plaintext that cannot be encrypted):
    one line for a person, never containing key material. Messages count segments from 1
    ("segment 1 of 4" is segment 0 above)."""


def recording_associated_data(recording_id: int) -> bytes:
    """The associated data callvault encrypts recording `recording_id`'s file with, so that
    a file moved onto another recording does not open."""
    return f"callvault recording {recording_id}".encode()


def new_data_key() -> bytes:
    """A new random data key for one recording."""
    return os.urandom(DATA_KEY_BYTES)


def _check_key(data_key: bytes) -> None:
    if len(data_key) != DATA_KEY_BYTES:
        raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes, not {len(data_key)}")


def _check_segment_size(segment_size: int) -> None:
    if not _MIN_SEGMENT_SIZE <= segment_size <= _MAX_SEGMENT_SIZE:
        raise ValueError(
            f"the segment size must be from {_MIN_SEGMENT_SIZE} to {_MAX_SEGMENT_SIZE} bytes, "
            f"not {segment_size}"
        )


def _segment_cipher(data_key: bytes, salt: bytes, associated_data: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=associated_data)
    return AESGCM(hkdf.derive(data_key))


def _nonce(prefix: bytes, segment: int, last: bool) -> bytes:
    return prefix + segment.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class _Layout:
    """Where the segments of a ciphertext of a given size are, checked against the format."""

    def __init__(self, ciphertext_size: int, segment_size: int) -> None:
        _check_segment_size(segment_size)
        full, rest = divmod(ciphertext_size, segment_size)
        count = full + 1 if rest else full
        if (
            ciphertext_size < HEADER_SIZE + TAG_BYTES
            or 0 < rest < TAG_BYTES
            or count > _MAX_SEGMENTS
        ):
            raise CipherError(
                f"{ciphertext_size} bytes is not a possible size of an encrypted file: "
                "it was truncated, or it is not one"
            )
        self.segment_size = segment_size
        self.ciphertext_size = ciphertext_size
        self.count = count
        self.plaintext_size = ciphertext_size - HEADER_SIZE - TAG_BYTES * count
        self._plain = segment_size - TAG_BYTES  # plaintext bytes of a full segment

    def segment_of(self, position: int) -> int:
        """The segment holding plaintext byte `position`."""
        return (position + HEADER_SIZE) // self._plain

    def plain_start(self, segment: int) -> int:
        """The plaintext position of the first byte of `segment`."""
        return segment * self._plain - HEADER_SIZE if segment else 0

    def start(self, segment: int) -> int:
        """The file offset of `segment`."""
        return segment * self.segment_size if segment else HEADER_SIZE

    def end(self, segment: int) -> int:
        """The file offset just past `segment`."""
        return min((segment + 1) * self.segment_size, self.ciphertext_size)

    def clamp(self, start: int, end: int) -> tuple[int, int]:
        if start < 0 or end < start:
            raise ValueError(f"not a range of bytes: [{start}, {end})")
        return min(start, self.plaintext_size), min(end, self.plaintext_size)


def ciphertext_size(plaintext_size: int, *, segment_size: int = SEGMENT_SIZE) -> int:
    """The size of the file that a plaintext of `plaintext_size` bytes encrypts to."""
    _check_segment_size(segment_size)
    if plaintext_size < 0:
        raise ValueError(f"a size cannot be negative: {plaintext_size}")
    full, rest = divmod(plaintext_size + HEADER_SIZE, segment_size - TAG_BYTES)
    return full * segment_size + (rest + TAG_BYTES if rest else 0)


def plaintext_size(ciphertext_size: int, *, segment_size: int = SEGMENT_SIZE) -> int:
    """The plaintext size of a file of `ciphertext_size` bytes.

    Raises `CipherError` if no file has that size (e.g. one truncated inside a tag). The
    size is not authenticated until the final segment is (`read_range` up to the end).
    """
    return _Layout(ciphertext_size, segment_size).plaintext_size


def ciphertext_span(
    start: int, end: int, ciphertext_size: int, *, segment_size: int = SEGMENT_SIZE
) -> tuple[int, int]:
    """The (offset, length) of the file bytes holding the segments that plaintext
    [start, end) needs, e.g. for one HTTP Range request to the store.

    The range is clamped like `read_range`'s; an empty one needs nothing: (0, 0). The header,
    file bytes [0, `HEADER_SIZE`), is needed as well; when offset is `HEADER_SIZE` the two
    are adjacent and one request can fetch both.
    """
    layout = _Layout(ciphertext_size, segment_size)
    start, end = layout.clamp(start, end)
    if start == end:
        return 0, 0
    offset = layout.start(layout.segment_of(start))
    return offset, layout.end(layout.segment_of(end - 1)) - offset


class Encryptor:
    """Encrypts one plaintext, fed in pieces, into a file of the format above.

    Feed the plaintext to `update` and call `finish` once; the concatenation of what they
    return is the file (the first call returns the header first). Besides what the caller
    passes and gets back, it holds at most one segment of plaintext, since a segment is
    sealed only when the next byte shows it is not the last.

    `salt` and `nonce_prefix` are for test vectors only: fixed values with the same data
    key and associated data reuse AES-GCM nonces, which gives the plaintexts away. Leave
    them out and they are random. `segment_size` too is for tests: the files of callvault
    use `SEGMENT_SIZE`, and the size is not recorded in the file.
    """

    def __init__(
        self,
        data_key: bytes,
        associated_data: bytes = b"",
        *,
        segment_size: int = SEGMENT_SIZE,
        salt: bytes | None = None,
        nonce_prefix: bytes | None = None,
    ) -> None:
        _check_key(data_key)
        _check_segment_size(segment_size)
        salt = os.urandom(SALT_BYTES) if salt is None else salt
        nonce_prefix = os.urandom(NONCE_PREFIX_BYTES) if nonce_prefix is None else nonce_prefix
        if len(salt) != SALT_BYTES or len(nonce_prefix) != NONCE_PREFIX_BYTES:
            raise ValueError(
                f"the salt is {SALT_BYTES} bytes and the nonce prefix {NONCE_PREFIX_BYTES}"
            )
        self._cipher = _segment_cipher(data_key, salt, associated_data)
        self._prefix = nonce_prefix
        self._header: bytes | None = bytes([HEADER_SIZE]) + salt + nonce_prefix
        self._plain = segment_size - TAG_BYTES
        self._room = self._plain - HEADER_SIZE  # what the current segment holds (segment 0)
        self._pending = bytearray()
        self._segment = 0
        self._finished = False
        self.plaintext_bytes = 0
        """How many plaintext bytes were fed so far."""

    def _write(
        self,
        segments: list[bytes | bytearray | memoryview],
        last: bool,
        reuse: bytearray | None = None,
    ) -> bytearray:
        """The header if not yet given, then `segments` sealed (the last one marked if
        `last`), in one buffer, `reuse` if given (resized) or a new one: each segment is
        sealed straight into it. (Sealing into a fresh 64 KiB object per segment and joining
        them cost ten times the AES itself, in the allocator and the copy; a new 1 MiB
        buffer per piece of a download still cost a third more than the AES in page
        faults, as the allocator gave the memory back and took it again.)"""
        if self._finished:
            raise ValueError("this Encryptor is finished")
        header, self._header = self._header, None
        start = len(header) if header is not None else 0
        size = start + sum(len(plain) + TAG_BYTES for plain in segments)
        if reuse is None:
            out = bytearray(size)
        else:
            out = reuse
            if len(out) > size:
                del out[size:]
            elif len(out) < size:
                out.extend(bytes(size - len(out)))
        if header is not None:
            out[:start] = header
        view = memoryview(out)
        at = start
        for number, plain in enumerate(segments):
            if self._segment >= _MAX_SEGMENTS:
                raise CipherError("the plaintext is too long for this format (2**32 segments)")
            end = at + len(plain) + TAG_BYTES
            nonce = _nonce(self._prefix, self._segment, last and number == len(segments) - 1)
            self._cipher.encrypt_into(nonce, plain, None, view[at:end])
            self._segment += 1
            at = end
        return out

    def update(
        self, data: bytes | bytearray | memoryview, *, reuse: bytearray | None = None
    ) -> bytearray:
        """Takes more plaintext; returns the file bytes ready so far (possibly none), in
        `reuse` if given (a buffer an earlier call returned, which the caller no longer
        needs: it is overwritten) or in a new buffer."""
        if self._finished:
            raise ValueError("this Encryptor is finished")
        view = memoryview(data).cast("B")
        self.plaintext_bytes += len(view)
        # A segment is sealed only once a byte beyond it is known to exist: the last one is
        # marked as such, and only `finish` knows which that is.
        segments: list[bytes | bytearray | memoryview] = []
        while len(self._pending) + len(view) > self._room:
            if self._pending:
                take = self._room - len(self._pending)
                self._pending += view[:take]
                segments.append(self._pending)
                self._pending = bytearray()
            else:  # a whole segment straight from the caller's buffer: no copy
                take = self._room
                segments.append(view[:take])
            view = view[take:]
            self._room = self._plain
        out = self._write(segments, last=False, reuse=reuse)
        self._pending += view
        return out

    def finish(self) -> bytearray:
        """Seals what is left as the last segment; returns the rest of the file."""
        out = self._write([self._pending], last=True)
        self._pending = bytearray()
        self._finished = True
        return out


def encrypt_file(
    data_key: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    associated_data: bytes = b"",
    *,
    segment_size: int = SEGMENT_SIZE,
) -> int:
    """Encrypts `src` (read to its end) into `dst`; returns the number of plaintext bytes."""
    encryptor = Encryptor(data_key, associated_data, segment_size=segment_size)
    while chunk := src.read(segment_size):
        dst.write(encryptor.update(chunk))
    dst.write(encryptor.finish())
    return encryptor.plaintext_bytes


def read_range(
    data_key: bytes,
    read_at: Callable[[int, int], bytes],
    ciphertext_size: int,
    start: int,
    end: int,
    associated_data: bytes = b"",
    *,
    segment_size: int = SEGMENT_SIZE,
    batch_segments: int = READ_BATCH_SEGMENTS,
) -> Iterator[bytes]:
    """The plaintext bytes [start, end) of a file of `ciphertext_size` bytes, in one chunk
    per segment they touch.

    `read_at(offset, length)` returns `length` bytes of the file from `offset`. It is called
    for the header (bytes 0 to 40) and then for the segments covering the range, contiguous
    in the file: one call for up to `batch_segments` of them (the header comes with the
    first when the range starts in segment 0). Nothing else of the file is read, and every
    segment read is authenticated before any of its bytes are returned.

    The range is clamped to the plaintext as a slice is: an `end` past the end reads to the
    end, and a `start` at or past it gives nothing (nor reads anything). A negative `start`
    or an `end` before `start` is a ValueError. Those checks and that of the size happen on
    the call; reading, and so a `CipherError` for a damaged file or a wrong key, happens as
    the iterator is consumed (take the first chunk before committing to a response).
    """
    _check_key(data_key)
    if batch_segments < 1:
        raise ValueError(f"batch_segments must be at least 1, not {batch_segments}")
    layout = _Layout(ciphertext_size, segment_size)
    start, end = layout.clamp(start, end)
    if start == end:
        return iter(())
    first, last = layout.segment_of(start), layout.segment_of(end - 1)
    return _decrypt(
        data_key, read_at, layout, first, last, start, end, associated_data, batch_segments
    )


def decrypt_all(
    data_key: bytes,
    read_at: Callable[[int, int], bytes],
    ciphertext_size: int,
    associated_data: bytes = b"",
    *,
    segment_size: int = SEGMENT_SIZE,
    batch_segments: int = READ_BATCH_SEGMENTS,
) -> Iterator[bytes]:
    """The whole plaintext, one chunk per segment, every segment authenticated (including
    the empty last segment of an empty plaintext). See `read_range`."""
    _check_key(data_key)
    if batch_segments < 1:
        raise ValueError(f"batch_segments must be at least 1, not {batch_segments}")
    layout = _Layout(ciphertext_size, segment_size)
    return _decrypt(
        data_key,
        read_at,
        layout,
        0,
        layout.count - 1,
        0,
        layout.plaintext_size,
        associated_data,
        batch_segments,
    )


def _read(read_at: Callable[[int, int], bytes], offset: int, length: int) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise CipherError(
            f"reading {length} bytes at offset {offset} gave {len(data)}: the file is not "
            "the size it was said to be (truncated or replaced?)"
        )
    return data


def _open_header(data_key: bytes, header: bytes, associated_data: bytes) -> tuple[AESGCM, bytes]:
    """The segment cipher and the nonce prefix of the file with this header."""
    if header[0] != HEADER_SIZE:
        raise CipherError(
            f"the header is damaged (its first byte is {header[0]}, not {HEADER_SIZE}), "
            "or the file is not an encrypted recording"
        )
    salt, prefix = header[1 : 1 + SALT_BYTES], header[1 + SALT_BYTES :]
    return _segment_cipher(data_key, salt, associated_data), prefix


def _decrypt(
    data_key: bytes,
    read_at: Callable[[int, int], bytes],
    layout: _Layout,
    first: int,
    last: int,
    start: int,
    end: int,
    associated_data: bytes,
    batch_segments: int,
) -> Iterator[bytes]:
    """Segments first..last, their plaintext trimmed to [start, end)."""
    cipher: AESGCM | None = None
    prefix = b""
    segment = first
    while segment <= last:
        upto = min(last, segment + batch_segments - 1)
        offset, stop = layout.start(segment), layout.end(upto)
        if cipher is None and segment == 0:  # the header and segment 0 are adjacent: one read
            offset = 0
            data = memoryview(_read(read_at, 0, stop))
            cipher, prefix = _open_header(data_key, bytes(data[:HEADER_SIZE]), associated_data)
        else:
            if cipher is None:
                header = _read(read_at, 0, HEADER_SIZE)
                cipher, prefix = _open_header(data_key, header, associated_data)
            data = memoryview(_read(read_at, offset, stop - offset))
        for number in range(segment, upto + 1):
            sealed = data[layout.start(number) - offset : layout.end(number) - offset]
            nonce = _nonce(prefix, number, number == layout.count - 1)
            try:
                plain = cipher.decrypt(nonce, sealed, None)
            except InvalidTag:
                raise CipherError(
                    f"segment {number + 1} of {layout.count} does not authenticate: {_DAMAGED}"
                ) from None
            base = layout.plain_start(number)
            if base < start or base + len(plain) > end:
                plain = plain[max(start - base, 0) : end - base]
            yield plain
        segment = upto + 1


def decrypt_file(
    data_key: bytes,
    src: BinaryIO,
    ciphertext_size: int,
    associated_data: bytes = b"",
    *,
    segment_size: int = SEGMENT_SIZE,
) -> Iterator[bytes]:
    """The whole plaintext of the file `src` (read from its start, once, in order), one
    chunk per segment, every segment authenticated: `decrypt_all` over a stream, for a
    file read through (a check, an export) rather than a range."""
    position = 0

    def read_at(offset: int, length: int) -> bytes:
        nonlocal position
        if offset != position:
            raise ValueError(f"decrypt_file reads in order: asked for {offset}, at {position}")
        parts: list[bytes] = []
        wanted = length
        while wanted > 0:
            chunk = src.read(wanted)
            if not chunk:
                break
            parts.append(chunk)
            wanted -= len(chunk)
        data = b"".join(parts)
        position += len(data)
        return data

    return decrypt_all(
        data_key, read_at, ciphertext_size, associated_data, segment_size=segment_size
    )
