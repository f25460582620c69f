"""The settings, fault switches and call record of the simulated Yeastar P-Series PBX."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

EDITIONS = ("software", "appliance", "cloud")
TOKEN_POLICIES = ("cap8", "invalidate_previous")
DOWNLOAD_FORMATS = ("wav", "mp3")
EXPIRED_URL_ANSWERS = ("html404", "json10004")
WEBHOOK_GET_PAYLOADS = ("body", "query")


@dataclass
class Webhook:
    """One of the PBX's "Webhook Event Push" entries (reference section 5.3).

    With ``method="GET"`` the event travels as the request body as well, unless
    :attr:`PSeriesConfig.webhook_get_payload` is ``"query"``: then it is the value of the
    query parameter ``body`` (URL-encoded) and the request has no body. Either way
    ``X-Signature`` is base64(HMAC-SHA256(secret, the event's raw JSON bytes)).
    """

    url: str
    secret: str = field(repr=False)
    method: str = "POST"
    events: tuple[int, ...] | None = None  # None: all events


@dataclass
class PSeriesFaults:
    """Fault switches of the simulated P-Series PBX; all off by default.

    The object of a running simulator is live: a test may change a field at any time and
    the next request sees it. ``*_next`` counters are consumed one per matching request,
    ``*_rate`` fields are probabilities drawn from the simulator's seeded RNG.
    """

    drop_next_downloads: int = 0
    """The next N file GETs send the headers and half the body, then close the connection."""
    drop_rate: float = 0.0
    """Probability that a file GET is dropped mid-body, as above."""
    error_5xx_next: int = 0
    """The next N requests under /openapi/ answer HTTP 502 with an HTML body, unprocessed."""
    error_5xx_rate: float = 0.0
    """Probability that a request under /openapi/ answers HTTP 502 with an HTML body."""
    html_error_next: int = 0
    """The next N file GETs answer an HTML 404 page."""
    recording_list_delay_s: float = 0.0
    """A recording is absent from recording/list|search, and recording/download answers
    60001 for it, until this many seconds (simulator clock) after its 30012 was emitted."""
    expire_urls: bool = False
    """Every download URL is already expired when used: the file GET answers as for any
    expired URL (see :attr:`PSeriesConfig.expired_url_answer`; default an HTML 404)."""
    ws_drop_next: int = 0
    """The next N WebSocket connections are closed by the PBX right after they subscribe
    (the SUCCESS answer is sent first)."""
    delete_after_url_next: int = 0
    """The next N recording/download answers delete the file right after issuing the URL:
    the file GET then answers as for an unknown URL."""
    bad_signature_next: int = 0
    """The next N webhook requests carry a wrong X-Signature."""
    slow_seconds: float = 0.0
    """Every HTTP answer (API and file GET) is delayed by this many real seconds."""


@dataclass
class PSeriesConfig:
    """How the simulated P-Series PBX is reached and behaves; see the module docstring of
    :mod:`callvault.simulator._pseries` for which switch stands for which unknown."""

    host: str = "127.0.0.1"
    port: int = 0
    tls: bool = True
    client_id: str = "callvault"
    client_secret: str | None = field(default=None, repr=False)
    serial: str = "3631A2124001"
    timezone: str = "Europe/Berlin"
    edition: str = "software"  # software | appliance | cloud (firmware 83.x / 37.x / 84.x)
    data_dir: Path | None = None
    seed: int | None = None
    token_policy: str = "cap8"  # noqa: S105 (cap8 | invalidate_previous; not a password)
    access_ttl_s: float = 1800.0
    refresh_ttl_s: float = 86400.0
    refresh_invalidates_old_access: bool = False
    display_format: str = "MM/DD/YYYY HH:mm:ss"
    unix_time_filters: bool = True
    download_format: str = "wav"  # wav | mp3
    async_downloads: bool = False
    single_use_urls: bool = False
    require_user_agent: bool = True
    ws_idle_timeout_s: float = 60.0
    close_ws_on_token_expiry: bool = False
    msg_as_object: bool = False
    webhooks: list[Webhook] = field(default_factory=list)
    webhook_retries: int = 3
    webhook_retry_interval_s: float = 1.0
    lockout_s: float | None = None
    ip_allow: tuple[str, ...] = ()
    permissions: frozenset[str] = frozenset({"recording", "cdr"})
    faults: PSeriesFaults = field(default_factory=PSeriesFaults)
    log_level: str = "warning"
    # -- beyond the agreed interface (all defaulted) ------------------------------------------
    expired_url_answer: str = "html404"
    """What a file GET of an unknown, expired, used-up (single_use_urls) or deleted URL
    answers: ``html404`` (HTTP 404, text/html) or ``json10004`` (HTTP 200, JSON 10004)."""
    webhook_get_payload: str = "body"
    """Where a GET webhook carries the event: ``body`` or ``query`` (parameter ``body``)."""
    call_status_events: bool = True
    """place_call also emits 30011 Call Status Changed events (RING, ANSWER, BYE) first."""
    async_delay_s: float = 0.2
    """Real seconds between an async recording/download answer (errcode 2) and its 30033."""
    recording_page_size: int = 20
    """Default page_size of recording/list|search (undocumented, reference section 3.1)."""


@dataclass(frozen=True)
class PSeriesCall:
    """A call placed on the simulated PBX, as its CDR, recording list and 30012 show it."""

    id: int  # recording id (recording/list 'id'); 0 when not recorded
    cdr_id: int  # cdr/list 'id'
    call_id: str  # "{epoch}.{seq}"
    uid: str
    time_start: str  # PBX local "YYYY-MM-DD HH:MM:SS"
    timestamp: int  # Unix seconds of the start
    call_from: str
    call_to: str
    call_duration: int
    talk_duration: int
    status: str
    type: str
    file: str | None  # recording name, None when not recorded
