"""Switchable faults: everything a real PBX (or the network to it) does wrong, on demand.

Every switch is off by default. The :class:`Faults` object of a running simulator is shared
with its state, so a test may change a field at any time and the next request sees it.
From the command line each field is set with ``--fault KEY[=VALUE]`` (see :func:`apply_fault`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Faults:
    """Fault switches of the simulated PBX. All off by default.

    Counters named ``*_next`` are consumed one per matching request; ``*_rate`` fields are
    probabilities per matching request drawn from the simulator's seeded RNG.
    """

    drop_next_downloads: int = 0
    """The next N recording downloads send the headers and half the body, then drop the
    connection (the announced Content-Length is never reached). Consumes the random."""

    drop_rate: float = 0.0
    """Probability that a recording download is dropped mid-body, as above."""

    slow_seconds: float = 0.0
    """Every HTTP response (API and download) is delayed by this many real seconds."""

    error_5xx_next: int = 0
    """The next N requests under /api/ answer HTTP 500, 502 or 503 with an HTML body, as a
    failing web server in front of the API would. The request is not processed at all."""

    error_5xx_rate: float = 0.0
    """Probability that a request under /api/ answers HTTP 5xx with an HTML body, as above."""

    html_error_next: int = 0
    """The next N requests under /api/ answer HTTP 404 with Boa's HTML "Not Found" page
    (not JSON), without being processed."""

    html_error_rate: float = 0.0
    """Probability that a request under /api/ answers Boa's HTTP 404 HTML page, as above."""

    not_ready_seconds: float = 0.0
    """A recording answers errno 20014 (to get_random and download) until this many seconds
    (simulator clock) after its NewCdr was emitted: the file is still being written."""

    delete_rate: float = 0.0
    """Probability that a newly recorded call's file is deleted (auto-cleanup) right after its
    NewCdr is emitted; it then answers errno 20014."""

    revoke_every_seconds: float = 0.0
    """Every N seconds (simulator clock) the PBX forgets every token (errno 20004 afterwards).
    No BootUp is sent. 0 disables."""

    reboot_every_seconds: float = 0.0
    """Every N seconds (simulator clock) the PBX reboots: all tokens and randoms are gone and
    BootUp is pushed to the app servers that were logged in. 0 disables."""

    invalidate_previous_tokens_on_login: bool = False
    """A successful login invalidates every earlier token of the same user (errno 20004).
    Ored with the same field of SimulatorConfig."""

    honour_range: bool = False
    """Answer a download's ``Range: bytes=a-b`` header with 206 Partial Content. Off: the
    header is ignored and the whole file is sent with 200, as Boa is assumed to do."""

    errno_2017: bool = False
    """Answer with the errno meanings of the 2017 documents, as API v1.0.1 always does: a
    recording that does not exist (never did, or is not written yet) is 20012 "the recording
    file does not exist", a deleted one 20014. Off (later firmware, paths v1.1.0 and
    v2.0.0): 20014 for both, and 20012 only means an invalid download random."""

    yswav_names: bool = False
    """Recording names end in ``.yswav``, as the Yeastar Cloud PBX's did before firmware
    81.9.0.14; the body is still a WAV file (a client probes the body, not the name)."""

    names_with_plus: bool = False
    """External numbers of generated calls (``place_random_call``) in international format,
    ``+4915112345678``, in the CDR and so in the recording name. Off: digits only
    (``015112345678``), as in every recording name seen from real PBXs. A client that does
    not URL-encode the name then asks for a space instead of the ``+``."""

    names_with_spaces: bool = False
    """External numbers of generated calls written with a space (``0151 12345678``): the
    recording names contain a space."""

    names_non_ascii: bool = False
    """The external party of generated calls is a caller-ID name with non-ASCII letters
    (``Müller``) instead of a number, in the CDR and the recording name; its download
    then carries those letters as raw bytes in ``Content-Disposition``."""

    disposition_latin1: bool = False
    """The file name in a download's ``Content-Disposition`` as raw Latin-1 bytes (letters
    outside Latin-1 become ``?``). Off: raw UTF-8 bytes. A real PBX is taken to copy the
    file name's bytes, not to use RFC 6266's ``filename*`` [?]."""

    v2_spellings_rate: float = 0.0
    """Probability that a call's NewCdr in format 2.0.0 uses the spellings the v2 documents
    show in places: status ``ANSWERD`` / ``NO ANSWERED`` and the trunk key ``dstrunkname``
    (instead of ``ANSWERED`` / ``NO ANSWER`` / ``dsttrcunkname``). Default 0: the v2
    example report, the only sample of what the firmware sends, spells them the usual way."""

    tcp_drop_next: int = 0
    """The next N connections to the TCP report port (``report_transport="tcp"``) are closed
    right after their login was answered with success, before any report."""

    tcp_close_after_reports: int = 0
    """Every connection to the TCP report port is closed once N reports were written to it.
    0 disables."""

    tcp_junk_next: int = 0
    """The next N reports over TCP are each preceded by a junk frame, framed like a report:
    in turn a line of text, a truncated JSON object, and a JSON object that is no report."""


_FIELDS = {f.name: f for f in dataclasses.fields(Faults)}


def fault_names() -> list[str]:
    """The keys accepted by :func:`apply_fault`."""
    return sorted(_FIELDS)


def apply_fault(faults: Faults, spec: str) -> None:
    """Set one field of `faults` from ``KEY[=VALUE]`` (dashes may stand for underscores).

    A bare KEY sets a boolean to true and a counter (``*_next*``) to 1; rates and seconds need
    a value. Raises ValueError with a one-line message for an unknown key or a bad value.
    """
    key, has_value, raw = spec.partition("=")
    name = key.strip().replace("-", "_")
    if name not in _FIELDS:
        raise ValueError(f"unknown fault {key.strip()!r}; known: {', '.join(fault_names())}")
    current = getattr(faults, name)
    value: bool | int | float
    if isinstance(current, bool):
        if not has_value or raw.strip().lower() in {"1", "true", "yes", "on"}:
            value = True
        elif raw.strip().lower() in {"0", "false", "no", "off"}:
            value = False
        else:
            raise ValueError(f"fault {name} takes true or false, not {raw!r}")
    elif isinstance(current, int):
        try:
            value = int(raw) if has_value else 1
        except ValueError:
            raise ValueError(f"fault {name} takes a whole number, not {raw!r}") from None
        if value < 0:
            raise ValueError(f"fault {name} must not be negative")
    else:
        if not has_value:
            raise ValueError(f"fault {name} needs a value: --fault {name}=NUMBER")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"fault {name} takes a number, not {raw!r}") from None
        if value < 0 or (name.endswith("_rate") and value > 1):
            raise ValueError(
                f"fault {name} must be between 0 and 1"
                if name.endswith("_rate")
                else f"fault {name} must not be negative"
            )
    setattr(faults, name, value)


def parse_faults(specs: list[str], base: Faults | None = None) -> Faults:
    """Build a Faults from repeated ``KEY[=VALUE]`` strings."""
    faults = dataclasses.replace(base) if base is not None else Faults()
    for spec in specs:
        apply_fault(faults, spec)
    return faults
