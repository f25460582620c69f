"""Data types of the S-Series API shared by the client, the archiver and the simulator.

Only plain data lives here: no I/O, no parsing logic beyond trivial normalisation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

PBX_KINDS = ("s-series", "cloud", "p-series")
"""The kinds of Yeastar PBX there is a client for: the S-Series API (`PbxClient`), the
S-Series-based Yeastar Cloud PBX (the same client: refresh tokens), and the P-Series
OpenAPI (`PSeriesClient`)."""


class ApiVersion(enum.StrEnum):
    """The `{version}` path segment of every API URL."""

    V1_0_1 = "v1.0.1"
    V1_1_0 = "v1.1.0"
    V2_0_0 = "v2.0.0"

    @classmethod
    def _missing_(cls, value: object) -> ApiVersion | None:
        """Also read "1.1.0" (no "v"), any case and padding, and the documents' typo "v1.10"
        (the V1 login page prints ``/api/v1.10/login``) as v1.1.0. The value kept, and so
        the path sent, is always the canonical one."""
        if not isinstance(value, str):
            return None
        text = value.strip().lower()
        text = text if text.startswith("v") else f"v{text}"
        if text == "v1.10":
            return cls.V1_1_0
        for member in cls:
            if member.value == text:
                return member
        return None

    @property
    def is_v2(self) -> bool:
        return self is ApiVersion.V2_0_0

    @property
    def report_format(self) -> str | None:
        """The login `version` that asks for well-formed JSON events for this API version.

        None for v1.0.1: it has no `version` field and always sends the legacy format.
        """
        if self is ApiVersion.V1_0_1:
            return None
        return "2.0.0" if self.is_v2 else "1.0.2"

    @property
    def has_cdr_export(self) -> bool:
        """The CDR export (``cdr/get_random`` + ``cdr/download``) came with v1.1.0."""
        return self is not ApiVersion.V1_0_1

    @property
    def cdr_extensions_field(self) -> str:
        """CDR export names its extension filter `extid` in v1 and `number` in v2."""
        return "number" if self.is_v2 else "extid"


class EventFormat(enum.StrEnum):
    """The push-report format an app server asked for with the login `version` field."""

    LEGACY = "legacy"  # no version: v1 JSON with repeated keys (v2 calls it 1.0.0)
    V1_0_2 = "1.0.2"
    V2_0_0 = "2.0.0"
    # The P-Series OpenAPI's one envelope, {"type": <id>, "sn": ..., "msg": ...} (no login
    # asks for it; never a value of the S-Series login's `version`).
    OPENAPI = "openapi"

    @classmethod
    def from_login_version(cls, version: str | None) -> EventFormat:
        if version == "1.0.2":
            return cls.V1_0_2
        if version == "2.0.0":
            return cls.V2_0_0
        return cls.LEGACY


@dataclass(frozen=True, slots=True)
class CallDetail:
    """One call detail record, from a NewCdr event or a row of the CDR export.

    Every field is as the PBX sent it except: durations are ints (None when absent or not
    a number), `status` is normalised (ANSWERED, NO ANSWER, BUSY, FAILED, VOICEMAIL),
    the destination trunk is read from any of its three spellings, and `recording` is
    None when the call was not recorded. `timestart` is PBX local time without a zone,
    "YYYY-MM-DD hh:mm:ss".
    """

    callid: str
    timestart: str = ""
    callfrom: str = ""
    callto: str = ""
    callduration: int | None = None
    talkduration: int | None = None
    srctrunkname: str = ""
    dsttrunkname: str = ""
    status: str = ""
    type: str = ""
    pincode: str = ""
    recording: str | None = None
    didnumber: str = ""
    agentringtime: int | None = None
    sn: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """A push report from the PBX. `name` is its `action`/`event` value, as sent.

    Unknown events are kept as plain `Event`s, never dropped.
    """

    name: str
    sn: str
    fields: dict[str, Any]
    format: EventFormat


@dataclass(frozen=True, slots=True)
class NewCdrEvent(Event):
    """The report sent once per call when it ends."""

    cdr: CallDetail = field(default_factory=lambda: CallDetail(callid=""))


@dataclass(frozen=True, slots=True)
class BootUpEvent(Event):
    """The PBX restarted: every token is gone, log in again."""


class StreamTransform(Protocol):
    """What a download may pass its body through before it is written (e.g. encryption at
    rest): `update` gets the body's bytes in order and returns what to write; `finish`
    returns the last bytes to write. The checks, size and SHA-256 of the download stay
    those of the body as the PBX sent it.

    `reuse` is a buffer an earlier `update` returned that the caller is done with: the
    transform may overwrite it and return it again instead of a new one (a download hands
    back its written buffers, so that a long body does not cost an allocation per piece)."""

    def update(
        self, data: bytes | memoryview, *, reuse: bytearray | None = None
    ) -> bytes | bytearray: ...

    def finish(self) -> bytes | bytearray: ...


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """A recording saved to disk, complete and verified."""

    name: str
    path: Path
    size: int
    sha256: str
    content_type: str
    # The SHA-256 of the file written, when the download's `transform` made it differ from
    # the body (e.g. encrypted) and it was asked for (`hash_stored`); None otherwise (it is
    # `sha256`, or nobody needed it).
    stored_sha256: str | None = None


STATUS_SPELLINGS: dict[str, str] = {
    "ANSWERED": "ANSWERED",
    "ANSWERD": "ANSWERED",
    "NO ANSWER": "NO ANSWER",
    "NO ANSWERED": "NO ANSWER",
    "NOANSWER": "NO ANSWER",
    "BUSY": "BUSY",
    "FAILED": "FAILED",
    "VOICEMAIL": "VOICEMAIL",
}


def normalise_status(value: str) -> str:
    """Map the documented spellings of a call status to one; unknown ones are kept upper-cased."""
    key = " ".join(value.strip().upper().split())
    return STATUS_SPELLINGS.get(key, key)
