"""Recordings as real WAV files: 8 kHz, 16-bit, mono PCM, written in constant memory."""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path

SAMPLE_RATE = 8000
SAMPLE_WIDTH = 2
CHANNELS = 1
BYTES_PER_SECOND = SAMPLE_RATE * SAMPLE_WIDTH * CHANNELS
HEADER_SIZE = 44
_CHUNK = 1 << 20


def wav_header(data_size: int) -> bytes:
    """The 44-byte RIFF/WAVE header of a PCM file with `data_size` bytes of samples."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_size,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        CHANNELS,
        SAMPLE_RATE,
        BYTES_PER_SECOND,
        SAMPLE_WIDTH * CHANNELS,
        SAMPLE_WIDTH * 8,
        b"data",
        data_size,
    )


def _tone_second(frequency: float) -> bytes:
    """One second of a quiet sine tone; whole cycles so that seconds join without a click."""
    samples = (
        int(6000 * math.sin(2 * math.pi * frequency * n / SAMPLE_RATE)) for n in range(SAMPLE_RATE)
    )
    return struct.pack(f"<{SAMPLE_RATE}h", *samples)


def write_wav(
    path: Path,
    *,
    seconds: float = 0.0,
    total_size: int | None = None,
    frequency: float = 440.0,
    marker: bytes = b"",
) -> tuple[int, str]:
    """Write a WAV to `path` atomically; return (size in bytes, SHA-256 hex).

    The file holds `seconds` of tone, or exactly `total_size` bytes in all when given (at
    least 44; a byte is dropped if needed to keep whole samples). Memory use stays constant.
    `marker` replaces the first samples (a few inaudible milliseconds) so that every call's
    recording has its own bytes and SHA-256, as real recordings do.
    """
    if total_size is not None:
        data_size = max(total_size - HEADER_SIZE, 0)
        data_size -= data_size % SAMPLE_WIDTH
    else:
        data_size = int(max(seconds, 0.0) * SAMPLE_RATE) * SAMPLE_WIDTH
    second = _tone_second(frequency)
    block = second * max(1, _CHUNK // len(second))
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as out:
        header = wav_header(data_size)
        out.write(header)
        digest.update(header)
        remaining = data_size
        first = True
        while remaining > 0:
            piece = block[: min(remaining, len(block))]
            if first and marker:
                stamp = marker[: len(piece) - len(piece) % SAMPLE_WIDTH]
                stamp = stamp[: len(stamp) - len(stamp) % SAMPLE_WIDTH]
                piece = stamp + piece[len(stamp) :]
                first = False
            out.write(piece)
            digest.update(piece)
            remaining -= len(piece)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return HEADER_SIZE + data_size, digest.hexdigest()
