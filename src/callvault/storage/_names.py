"""Turning untrusted names from the PBX into safe storage keys.

A recording name comes from the PBX (a NewCdr event or the CDR export) and is untrusted.
A name that matches `SAFE_NAME` (ASCII letters, digits, ``+ . _ -``, not starting with a
dot, no ``..``, at most 200 characters, not a reserved device name) is used as it is;
any other name is replaced by a derived one: its safe characters, a hash of the whole
name (so two different unsafe names never share a file), and its extension when that is
safe. Every key is checked again by the storage before it touches the disk.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import datetime

SAFE_NAME = re.compile(r"[0-9A-Za-z+][0-9A-Za-z+._-]{0,199}")
_SAFE_SERIAL = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,63}")
_SAFE_EXTENSION = re.compile(r"\.[0-9A-Za-z]{1,10}")
_UNSAFE_CHARS = re.compile(r"[^0-9A-Za-z+._-]+")
# Names Windows treats as devices, whatever the extension: refused so an archive can be
# copied to any filesystem.
_RESERVED_STEMS = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)
_DERIVED_STEM_MAX = 80
# Top-level names reserved for callvault's own files beside the recordings (the index).
RESERVED_PREFIX = "callvault."


class UnsafeNameError(ValueError):
    """A storage key would leave the storage root or is not in the safe form."""


def is_safe_name(name: str) -> bool:
    """True if `name` can be used as one path component exactly as it is."""
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        return False
    stem = name.split(".", 1)[0].upper()
    return stem not in _RESERVED_STEMS


def safe_name(name: str) -> str:
    """`name` itself when it is safe, else a safe name derived from it (deterministic)."""
    if is_safe_name(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    extension = ""
    dot = name.rfind(".")
    if dot > 0 and _SAFE_EXTENSION.fullmatch(name[dot:]):
        extension = name[dot:].lower()
        name = name[:dot]
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    stem = _UNSAFE_CHARS.sub("_", ascii_name).replace("..", "_")
    stem = stem.lstrip("._-")[:_DERIVED_STEM_MAX].rstrip(".")
    derived = f"{stem}_{digest}{extension}" if stem else f"x_{digest}{extension}"
    if not is_safe_name(derived):
        derived = f"x_{digest}{extension}"
    return derived


def safe_serial(pbx_serial: str) -> str:
    """The PBX serial as a directory name: itself if plain, ``unknown`` if empty, else derived."""
    if not pbx_serial:
        return "unknown"
    if _SAFE_SERIAL.fullmatch(pbx_serial) and pbx_serial.split(".")[0].upper() not in (
        _RESERVED_STEMS
    ):
        return pbx_serial
    digest = hashlib.sha256(pbx_serial.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"sn_{digest}"


def recording_key(pbx_serial: str, start_local: datetime, name: str) -> str:
    """The storage key of a recording: ``<serial or 'unknown'>/<YYYY>/<MM>/<DD>/<safe name>``.

    `start_local` is the call's start in the PBX's local time (the date people look for).
    """
    return (
        f"{safe_serial(pbx_serial)}/{start_local.year:04d}/{start_local.month:02d}/"
        f"{start_local.day:02d}/{safe_name(name)}"
    )


def check_key(key: str) -> list[str]:
    """Split a storage key into its components, refusing anything not in the safe form."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise UnsafeNameError("storage key is empty or too long")
    parts = key.split("/")
    for part in parts:
        if not is_safe_name(part):
            raise UnsafeNameError(f"storage key component is not safe: {part!r:.80}")
    if parts[0].startswith(RESERVED_PREFIX):
        raise UnsafeNameError(f"storage key uses a reserved name: {parts[0]!r:.80}")
    return parts
