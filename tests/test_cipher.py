"""The encrypted file format of recordings (`callvault.cipher`): round trips, random access
that reads only what a range needs, tampering, fixed vectors, and Tink reading our files and
us reading Tink's (tink is in the dev extras: those tests fail, never skip, without it)."""

from __future__ import annotations

import base64
import hashlib
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from callvault import cipher
from callvault.cipher import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    CipherError,
    Encryptor,
    ciphertext_size,
    ciphertext_span,
    decrypt_all,
    encrypt_file,
    new_data_key,
    plaintext_size,
    read_range,
)

S = SEGMENT_SIZE
FIRST = S - 16 - HEADER_SIZE  # plaintext bytes of segment 0: 65480
PLAIN = S - 16  # plaintext bytes of a later full segment: 65520
KEY = bytes(range(32))  # of the fixed vectors and the tampering tests
AD = b"callvault test vector"


def pattern(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def encrypt(
    key: bytes, plaintext: bytes, ad: bytes = b"", chunks: Iterator[int] | None = None, **kw: Any
) -> bytes:
    encryptor = Encryptor(key, ad, **kw)
    out, fed = [], 0
    for size in chunks or iter(()):
        if fed >= len(plaintext):
            break
        out.append(encryptor.update(plaintext[fed : fed + size]))
        fed += size
    out.append(encryptor.update(plaintext[fed:]))
    out.append(encryptor.finish())
    return b"".join(out)


def reader(ciphertext: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, length: ciphertext[offset : offset + length]


def decrypt(key: bytes, ciphertext: bytes, ad: bytes = b"", **kw: Any) -> bytes:
    return b"".join(decrypt_all(key, reader(ciphertext), len(ciphertext), ad, **kw))


@dataclass
class RecordingReader:
    """A read_at over bytes that remembers what was asked of it."""

    ciphertext: bytes
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and length > 0 and offset + length <= len(self.ciphertext)
        self.calls.append((offset, length))
        return self.ciphertext[offset : offset + length]


def reference_segments(size: int, segment_size: int) -> list[tuple[int, int]]:
    """(plaintext start, plaintext length) of each segment, cut as the format says."""
    room, segments, position = segment_size - 16 - HEADER_SIZE, [], 0
    while True:
        take = min(room, size - position)
        if position + take == size:  # last: the rest, possibly empty, never an extra empty one
            segments.append((position, take))
            return segments
        segments.append((position, take))
        position += take
        room = segment_size - 16


def reference_encrypt(
    key: bytes, ad: bytes, salt: bytes, prefix: bytes, segments: list[bytes]
) -> bytes:
    """The format, written straight from the docstring of callvault.cipher (given the cut)."""
    segment_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=ad).derive(key)
    aead = AESGCM(segment_key)
    out = [bytes([40]) + salt + prefix]
    for i, plaintext in enumerate(segments):
        nonce = prefix + i.to_bytes(4, "big") + bytes([i == len(segments) - 1])
        out.append(aead.encrypt(nonce, plaintext, None))
    return b"".join(out)


# -- round trips ------------------------------------------------------------------------------

ODD_CHUNKS = [1, 7, 4099, 65521, 100003, 13, 65480]


def odd_chunks() -> Iterator[int]:
    while True:
        yield from ODD_CHUNKS


@pytest.mark.parametrize(
    "size",
    [0, 1, FIRST - 1, FIRST, FIRST + 1, S, FIRST + PLAIN, FIRST + PLAIN + 1, 5 * S + 3, 3_000_017],
)
def test_round_trip_around_segment_boundaries(size: int) -> None:
    key, plaintext = new_data_key(), pattern(size, size)
    ciphertext = encrypt(key, plaintext, b"rec-1", odd_chunks())
    assert len(ciphertext) == ciphertext_size(size)
    assert plaintext_size(len(ciphertext)) == size
    assert decrypt(key, ciphertext, b"rec-1") == plaintext
    # fed whole, the same plaintext gives a file of the same shape
    assert len(encrypt(key, plaintext, b"rec-1")) == len(ciphertext)


def test_sizes_of_the_format() -> None:
    assert ciphertext_size(0) == 56  # the header and one empty segment: its tag alone
    assert ciphertext_size(1) == 57
    assert ciphertext_size(FIRST) == S  # a full last segment, no empty one after it
    assert ciphertext_size(FIRST + 1) == S + 1 + 16
    assert ciphertext_size(FIRST + 2 * PLAIN) == 3 * S
    for size in range(0, 2000):
        assert plaintext_size(ciphertext_size(size, segment_size=100), segment_size=100) == size
    for impossible in [0, 1, 55, S + 1, S + 15, 3 * S + 15]:
        with pytest.raises(CipherError, match="not a possible size"):
            plaintext_size(impossible)
    with pytest.raises(ValueError, match="segment size"):
        ciphertext_size(10, segment_size=56)


def test_the_encryptor_holds_back_at_most_one_segment() -> None:
    encryptor, fed, emitted = Encryptor(new_data_key(), segment_size=100), 0, 0
    for size in [1, 50, 3, 200, 44, 1, 1000, 7]:
        emitted += len(encryptor.update(bytes(size)))
        fed += size
        # segment 0 and the header fill 100 bytes, as does each later segment
        assert emitted == HEADER_SIZE or emitted % 100 == 0
        sealed = emitted // 100
        assert fed - (emitted - HEADER_SIZE - 16 * sealed) <= 84  # one segment's plaintext
    emitted += len(encryptor.finish())
    assert emitted == ciphertext_size(fed, segment_size=100)
    with pytest.raises(ValueError, match="finished"):
        encryptor.update(b"x")


@settings(max_examples=200, deadline=None)
@given(
    segment_size=st.sampled_from([57, 100]),
    plaintext=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_how_the_plaintext_is_fed_does_not_change_the_file(
    segment_size: int, plaintext: bytes, cuts: list[int]
) -> None:
    fixed = {"segment_size": segment_size, "salt": bytes(32), "nonce_prefix": bytes(7)}
    whole = encrypt(KEY, plaintext, **fixed)
    encryptor, out, previous = Encryptor(KEY, **fixed), [], 0
    for cut in [*sorted(cuts), len(plaintext)]:
        out.append(encryptor.update(plaintext[previous:cut]))
        previous = max(previous, cut)
    out.append(encryptor.finish())
    assert b"".join(out) == whole
    assert decrypt(KEY, whole, segment_size=segment_size) == plaintext


@settings(max_examples=200, deadline=None)
@given(
    plaintext=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    spare_size=st.integers(0, 300),
)
def test_a_reused_buffer_gives_the_same_file(
    plaintext: bytes, cuts: list[int], spare_size: int
) -> None:
    """`update(reuse=)` overwrites and resizes the buffer it is handed (a download hands
    back each piece once written): the file is the same as with new buffers."""
    fixed = {"segment_size": 57, "salt": bytes(32), "nonce_prefix": bytes(7)}
    whole = encrypt(KEY, plaintext, **fixed)
    encryptor, out, previous = Encryptor(KEY, **fixed), bytearray(), 0
    spare = bytearray(b"\xff" * spare_size)
    for cut in [*sorted(cuts), len(plaintext)]:
        piece = encryptor.update(plaintext[previous:cut], reuse=spare)
        assert piece is spare
        out += piece  # written out; the buffer is handed back next time
        previous = max(previous, cut)
    out += encryptor.finish()
    assert bytes(out) == whole


def test_encrypt_file() -> None:
    key, plaintext = new_data_key(), pattern(3 * S + 5)
    dst = io.BytesIO()
    assert encrypt_file(key, io.BytesIO(plaintext), dst, b"ad") == len(plaintext)
    assert decrypt(key, dst.getvalue(), b"ad") == plaintext


def test_each_file_gets_its_own_salt_and_nonce_prefix() -> None:
    key = new_data_key()
    assert encrypt(key, b"same")[:HEADER_SIZE] != encrypt(key, b"same")[:HEADER_SIZE]


# -- random access ----------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    segment_size=st.sampled_from([57, 64, 100, 300]),
    batch=st.sampled_from([1, 2, 3, 16]),
    data=st.data(),
)
def test_read_range_reads_only_the_header_and_the_covered_segments(
    segment_size: int, batch: int, data: st.DataObject
) -> None:
    size = data.draw(st.integers(0, 5 * segment_size), label="size")
    start = data.draw(st.integers(0, size + 3), label="start")
    end = data.draw(st.integers(start, size + 3), label="end")
    key, plaintext = new_data_key(), pattern(size, size)
    ciphertext = encrypt(key, plaintext, b"ad", segment_size=segment_size)
    read_at = RecordingReader(ciphertext)

    chunks = list(
        read_range(
            key, read_at, len(ciphertext), start, end, b"ad",
            segment_size=segment_size, batch_segments=batch,
        )
    )  # fmt: skip

    assert b"".join(chunks) == plaintext[start:end]
    stop = min(end, size)
    covered = [
        (first, length)
        for first, length in reference_segments(size, segment_size)
        if start < stop and first < stop and start < first + length
    ]
    assert len(chunks) == len(covered)
    if not covered:
        assert read_at.calls == []
        assert ciphertext_span(start, end, len(ciphertext), segment_size=segment_size) == (0, 0)
        return
    assert sum(length for _, length in read_at.calls) == HEADER_SIZE + sum(
        length + 16 for _, length in covered
    )
    batches = -(-len(covered) // batch)
    assert len(read_at.calls) == batches + (0 if covered[0][0] == 0 else 1)
    assert read_at.calls[0][0] == 0
    offset, span = ciphertext_span(start, end, len(ciphertext), segment_size=segment_size)
    assert span == sum(length + 16 for _, length in covered)
    assert read_at.calls[-1][0] + read_at.calls[-1][1] == offset + span
    if covered[0][0] == 0:
        assert offset == HEADER_SIZE and read_at.calls[0][0] == 0
    else:
        assert read_at.calls[0] == (0, HEADER_SIZE) and read_at.calls[1][0] == offset


def test_a_range_of_a_big_file_takes_two_reads() -> None:
    key, plaintext = new_data_key(), pattern(20 * S)
    ciphertext = encrypt(key, plaintext)
    read_at = RecordingReader(ciphertext)
    start, end = 7 * S + 11, 9 * S + 3
    assert b"".join(read_range(key, read_at, len(ciphertext), start, end)) == plaintext[start:end]
    assert read_at.calls == [(0, HEADER_SIZE), (7 * S, 3 * S)]
    read_at.calls.clear()
    assert b"".join(read_range(key, read_at, len(ciphertext), 0, 100)) == plaintext[:100]
    assert read_at.calls == [(0, S)]  # the header with segment 0
    read_at.calls.clear()
    assert b"".join(decrypt_all(key, read_at, len(ciphertext))) == plaintext
    assert len(read_at.calls) == 2  # 21 segments in batches of 16
    assert sum(length for _, length in read_at.calls) == len(ciphertext)


def test_ranges_are_clamped_like_slices() -> None:
    key, plaintext = new_data_key(), pattern(1000)
    ciphertext = encrypt(key, plaintext)
    read_at = reader(ciphertext)
    assert b"".join(read_range(key, read_at, len(ciphertext), 990, 5000)) == plaintext[990:]
    assert list(read_range(key, read_at, len(ciphertext), 1000, 1000)) == []
    assert list(read_range(key, read_at, len(ciphertext), 4000, 5000)) == []
    for start, end in [(-1, 5), (10, 9)]:
        with pytest.raises(ValueError, match="not a range"):
            read_range(key, read_at, len(ciphertext), start, end)


def test_an_empty_plaintext_is_still_authenticated() -> None:
    key = new_data_key()
    ciphertext = encrypt(key, b"")
    assert len(ciphertext) == 56 and decrypt(key, ciphertext) == b""
    with pytest.raises(CipherError, match="segment 1 of 1 does not authenticate"):
        decrypt(new_data_key(), ciphertext)


# -- tampering --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_segments() -> tuple[bytes, bytes]:
    plaintext = pattern(FIRST + 2 * PLAIN + 1000)
    return plaintext, encrypt(KEY, plaintext, AD)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def tampered_cases(ct: bytes) -> list[tuple[str, bytes, bytes, bytes, str]]:
    """(case, key, ciphertext, ad, expected message) for each kind of damage."""
    swapped = ct[:S] + ct[2 * S : 3 * S] + ct[S : 2 * S] + ct[3 * S :]
    return [
        ("segment byte", KEY, flip(ct, 2 * S + 100), AD, "segment 3 of 4 does not authenticate"),
        ("tag byte", KEY, flip(ct, len(ct) - 1), AD, "segment 4 of 4 does not authenticate"),
        ("header length", KEY, flip(ct, 0), AD, "header is damaged"),
        ("header salt", KEY, flip(ct, 5), AD, "segment 1 of 4 does not authenticate"),
        ("header prefix", KEY, flip(ct, 39), AD, "segment 1 of 4 does not authenticate"),
        ("cut at a boundary", KEY, ct[: 3 * S], AD, "segment 3 of 3 does not authenticate"),
        ("cut inside the last", KEY, ct[:-5], AD, "segment 4 of 4 does not authenticate"),
        ("cut inside a tag", KEY, ct[: 3 * S + 10], AD, "not a possible size"),
        ("swapped segments", KEY, swapped, AD, "segment 2 of 4 does not authenticate"),
        ("wrong key", bytes(32), ct, AD, "segment 1 of 4 does not authenticate"),
        ("wrong associated data", KEY, ct, b"another", "segment 1 of 4 does not authenticate"),
    ]


def test_every_kind_of_damage_is_a_cipher_error(four_segments: tuple[bytes, bytes]) -> None:
    _, ciphertext = four_segments
    for _case, key, damaged, ad, message in tampered_cases(ciphertext):
        with pytest.raises(CipherError, match=message):
            decrypt(key, damaged, ad)
        # so does a range that reads the damaged part (all do: segment 3 to the end)
        with pytest.raises(CipherError):
            b"".join(read_range(key, reader(damaged), len(damaged), FIRST + PLAIN + 5, 10**9, ad))


def test_damage_outside_a_range_does_not_stop_it(four_segments: tuple[bytes, bytes]) -> None:
    plaintext, ciphertext = four_segments
    damaged = flip(ciphertext, 3 * S + 7)
    chunks = read_range(KEY, reader(damaged), len(damaged), 10, FIRST + 5, AD)
    assert b"".join(chunks) == plaintext[10 : FIRST + 5]


def test_a_reader_that_returns_less_is_a_cipher_error(four_segments: tuple[bytes, bytes]) -> None:
    _, ciphertext = four_segments
    short = ciphertext[: 2 * S]  # the file on disk is shorter than the size we were told
    with pytest.raises(CipherError, match="not the size it was said to be"):
        b"".join(decrypt_all(KEY, reader(short), len(ciphertext), AD))


def test_no_message_gives_the_key_away(four_segments: tuple[bytes, bytes]) -> None:
    _, ciphertext = four_segments
    messages = []
    for _, key, damaged, ad, _ in tampered_cases(ciphertext):
        with pytest.raises(CipherError) as caught:
            decrypt(key, damaged, ad)
        messages.append(str(caught.value))
    with pytest.raises(ValueError) as caught_length:
        Encryptor(KEY + b"!")
    messages.append(str(caught_length.value))
    for key in [KEY, bytes(32)]:
        forms = {
            key.hex(),
            key.hex().upper(),
            base64.b64encode(key).decode(),
            base64.urlsafe_b64encode(key).decode(),
            base64.urlsafe_b64encode(key).decode().rstrip("="),
        }
        for message in messages:
            assert "\n" not in message
            assert not any(form in message for form in forms), message
            assert repr(key) not in message


# -- fixed vectors ----------------------------------------------------------------------------

VECTOR_SALT = bytes(range(0x80, 0xA0))
VECTOR_PREFIX = bytes.fromhex("f0f1f2f3f4f5f6")


def vector_plaintext(size: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(size))


# (segment size, plaintext size, ciphertext size, SHA-256 of the ciphertext); the key is
# bytes 0..31, the associated data AD, salt VECTOR_SALT and nonce prefix VECTOR_PREFIX.
VECTORS = [
    (S, 0, 56, "cbb923927c4d129ba4ff3124a73e9d9e36c941d36db667652df483b338204d19"),
    (S, 1, 57, "a2803a52e63c773a52337a2476ae523a302992d488dcc0bda346969d7dfa7fe8"),
    (S, FIRST, S, "8c7552d6bec450585c7f2d4edd4759400dc265828c2a4be2635e9c5518177324"),
    (S, FIRST + 1, S + 17, "8c9317d42d49ff02c43cb89ce75cb1f0af4481f4c32c28fe34c98ca6db58d903"),
    (S, FIRST + 2 * PLAIN, 3*S, "2a9a3768fdc17b6174e753abf3195233a2e786efc6e939e3c0c01a198f9354c9"),
    (S, 200000, 200104, "66aad7e1d5dff032ff33903a5bdeeedb1d0e16e70b7e26afe6a976433c95745e"),
    (100, 44, 100, "c36b32a404b50a40463b0bf8da9b71ac4c7aa48e3ed780a0545104c2066da080"),
    (100, 45, 117, "aa0ee442db709cc961dd0e7abefc332c31a1b854bec87558fa3b2c488d1193d9"),
    (100, 250, 354, "5c7a1e1756d3d2bdd41cf00967ea5a24783bf374c5583e2d3932baf2d39be1d0"),
]  # fmt: skip

# The two smallest in full, for whoever writes another reader.
VECTOR_EMPTY = bytes.fromhex(
    "28808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
    "f0f1f2f3f4f5f61cb40e6f9a736a41f5b55b47797bfbee"
)
VECTOR_ONE_BYTE = bytes.fromhex(
    "28808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
    "f0f1f2f3f4f5f6e433b79f99526225b16333bb55ddfa7eaf"
)


def vector_ciphertext(segment_size: int, size: int) -> bytes:
    return encrypt(
        KEY, vector_plaintext(size), AD, odd_chunks(),
        segment_size=segment_size, salt=VECTOR_SALT, nonce_prefix=VECTOR_PREFIX,
    )  # fmt: skip


@pytest.mark.parametrize(("segment_size", "size", "ct_size", "digest"), VECTORS)
def test_fixed_vectors(segment_size: int, size: int, ct_size: int, digest: str) -> None:
    ciphertext = vector_ciphertext(segment_size, size)
    assert len(ciphertext) == ct_size
    assert hashlib.sha256(ciphertext).hexdigest() == digest
    plaintext = vector_plaintext(size)
    # the same bytes as the format written straight from its description
    cut = [plaintext[a : a + n] for a, n in reference_segments(size, segment_size)]
    assert reference_encrypt(KEY, AD, VECTOR_SALT, VECTOR_PREFIX, cut) == ciphertext
    assert decrypt(KEY, ciphertext, AD, segment_size=segment_size) == plaintext


def test_the_smallest_vectors_in_full() -> None:
    assert vector_ciphertext(S, 0) == VECTOR_EMPTY
    assert vector_ciphertext(S, 1) == VECTOR_ONE_BYTE
    assert decrypt(KEY, VECTOR_ONE_BYTE, AD) == vector_plaintext(1)


def test_a_final_empty_segment_after_a_full_one_is_read() -> None:
    # Our writer never makes one (nor does Tink's), but Tink's readers accept it, so we do.
    plaintext = pattern(FIRST + PLAIN)
    segments = [plaintext[:FIRST], plaintext[FIRST:], b""]
    ciphertext = reference_encrypt(KEY, AD, VECTOR_SALT, VECTOR_PREFIX, segments)
    assert len(ciphertext) == 2 * S + 16
    assert decrypt(KEY, ciphertext, AD) == plaintext


# -- Tink -------------------------------------------------------------------------------------


class Tink:
    """Tink's streaming AEAD with an AesGcmHkdfStreaming key we choose the bytes of."""

    def __init__(self) -> None:
        try:
            import tink
            from tink import secret_key_access, streaming_aead
            from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2
        except ImportError as error:  # in the dev extras: a missing tink is a failure
            pytest.fail(f"tink is missing (pip install -e '.[dev]'): {error}")
        streaming_aead.register()
        self._tink, self._access, self._sa = tink, secret_key_access, streaming_aead
        self._pb, self._common, self._tink_pb = aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

    def primitive(self, key: bytes, segment_size: int) -> Any:
        key_proto = self._pb.AesGcmHkdfStreamingKey(
            version=0,
            key_value=key,
            params=self._pb.AesGcmHkdfStreamingParams(
                ciphertext_segment_size=segment_size,
                derived_key_size=32,
                hkdf_hash_type=self._common.SHA256,
            ),
        )
        keyset = self._tink_pb.Keyset(
            primary_key_id=7,
            key=[
                self._tink_pb.Keyset.Key(
                    key_data=self._tink_pb.KeyData(
                        type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                        value=key_proto.SerializeToString(),
                        key_material_type=self._tink_pb.KeyData.SYMMETRIC,
                    ),
                    status=self._tink_pb.ENABLED,
                    key_id=7,
                    output_prefix_type=self._tink_pb.RAW,
                )
            ],
        )
        handle = self._tink.proto_keyset_format.parse(
            keyset.SerializeToString(), self._access.TOKEN
        )
        return handle.primitive(self._sa.StreamingAead)

    def encrypt(self, key: bytes, plaintext: bytes, ad: bytes, segment_size: int = S) -> bytes:
        class Kept(io.BytesIO):
            def close(self) -> None:  # Tink closes its destination; keep what it wrote
                pass

        out = Kept()
        with self.primitive(key, segment_size).new_encrypting_stream(out, ad) as stream:
            stream.write(plaintext)
        return out.getvalue()

    def decrypt(self, key: bytes, ciphertext: bytes, ad: bytes, segment_size: int = S) -> bytes:
        primitive = self.primitive(key, segment_size)
        with primitive.new_decrypting_stream(io.BytesIO(ciphertext), ad) as stream:
            return bytes(stream.read())

    @property
    def error(self) -> type[Exception]:
        return self._tink.TinkError  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tink() -> Tink:
    return Tink()


INTEROP = [
    (S, 0),
    (S, 1),
    (S, FIRST),
    (S, FIRST + 1),
    (S, FIRST + 2 * PLAIN),
    (S, 4 * S + 321),
    (57, 0),
    (57, 1),
    (57, 2),
    (100, 44),
    (100, 45),
    (100, 1234),
]


@pytest.mark.parametrize(("segment_size", "size"), INTEROP)
def test_tink_encrypts_we_decrypt(tink: Tink, segment_size: int, size: int) -> None:
    key, plaintext = new_data_key(), pattern(size, size)
    ciphertext = tink.encrypt(key, plaintext, b"rec-7", segment_size)
    assert len(ciphertext) == ciphertext_size(size, segment_size=segment_size)
    assert decrypt(key, ciphertext, b"rec-7", segment_size=segment_size) == plaintext
    rng = random.Random(size)
    for _ in range(20):
        start = rng.randrange(size + 1)
        end = rng.randrange(start, size + 2)
        chunks = read_range(
            key, reader(ciphertext), len(ciphertext), start, end, b"rec-7",
            segment_size=segment_size,
        )  # fmt: skip
        assert b"".join(chunks) == plaintext[start:end]


@pytest.mark.parametrize(("segment_size", "size"), INTEROP)
def test_we_encrypt_tink_decrypts(tink: Tink, segment_size: int, size: int) -> None:
    key, plaintext = new_data_key(), pattern(size, size)
    ciphertext = encrypt(key, plaintext, b"rec-7", odd_chunks(), segment_size=segment_size)
    assert tink.decrypt(key, ciphertext, b"rec-7", segment_size) == plaintext
    with pytest.raises(tink.error):
        tink.decrypt(key, ciphertext, b"rec-8", segment_size)


@pytest.mark.parametrize(("segment_size", "size", "ct_size", "digest"), VECTORS)
def test_tink_decrypts_the_fixed_vectors(
    tink: Tink, segment_size: int, size: int, ct_size: int, digest: str
) -> None:
    ciphertext = vector_ciphertext(segment_size, size)
    assert hashlib.sha256(ciphertext).hexdigest() == digest
    assert tink.decrypt(KEY, ciphertext, AD, segment_size) == vector_plaintext(size)


def test_tink_agrees_on_the_edge_cases(tink: Tink, four_segments: tuple[bytes, bytes]) -> None:
    _, ciphertext = four_segments
    # a file cut at a segment boundary: the last flag catches it in Tink as here
    with pytest.raises(tink.error):
        tink.decrypt(KEY, ciphertext[: 3 * S], AD)
    # a final empty segment after a full one: Tink reads it, as we do
    full = pattern(FIRST + PLAIN)
    made = reference_encrypt(KEY, AD, VECTOR_SALT, VECTOR_PREFIX, [full[:FIRST], full[FIRST:], b""])
    assert tink.decrypt(KEY, made, AD) == full


def test_module_constants() -> None:
    assert (cipher.DATA_KEY_BYTES, cipher.SEGMENT_SIZE, cipher.HEADER_SIZE) == (32, 65536, 40)
    assert len(new_data_key()) == 32 and new_data_key() != new_data_key()


@pytest.mark.parametrize("size", [0, 1, 65480, 65481, 3 * 65536 + 7])
def test_decrypt_file_reads_a_stream_once_in_order(size: int) -> None:
    key = cipher.new_data_key()
    plaintext = pattern(size, seed=size)
    sealed = encrypt(key, plaintext, b"ad")
    chunks = list(cipher.decrypt_file(key, io.BytesIO(sealed), len(sealed), b"ad"))
    assert b"".join(chunks) == plaintext
    # A stream shorter than the size it was said to have: one line, not a short plaintext.
    if size > 100:
        short = io.BytesIO(sealed[:-100])
        with pytest.raises(CipherError, match="not the size it was said to be"):
            b"".join(cipher.decrypt_file(key, short, len(sealed), b"ad"))
