"""The settings of one simulated PBX."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from callvault.simulator._faults import Faults


@dataclass
class SimulatorConfig:
    """How the simulated S-Series PBX is reached and behaves.

    `password` None means a random one is generated at start (read it from
    ``Simulator.password``). `port` 0 picks a free port. `timezone` is the PBX's zone: CDR
    times and recording names are local times in it. `data_dir` None means a temporary
    directory removed when the simulator stops.
    """

    kind: str = "s-series"
    """``s-series``, or ``cloud``: the Yeastar Cloud PBX, the same API whose login also
    answers a refresh token; its tokens end 30 minutes after they were issued unless
    renewed with ``token/refresh`` (both rotate)."""
    host: str = "127.0.0.1"
    port: int = 0
    tls: bool = True
    username: str = "api"
    password: str | None = field(default=None, repr=False)
    serial: str = "369351034049"
    timezone: str = "Europe/Berlin"
    data_dir: Path | None = None
    invalidate_previous_tokens_on_login: bool = False
    event_retry_interval: float = 2.0
    event_max_retries: int = 10
    calls_per_minute: float = 0.0
    seed: int | None = None
    faults: Faults = field(default_factory=Faults)
    legacy_tls: bool = False
    """False: TLS 1.2 only (the PBX's default "High" security level). True: also TLS 1.0/1.1
    as far as the local OpenSSL allows ("Low" level)."""
    call_progress_reports: bool = True
    """Push the call-progress reports of every placed call before its NewCdr: ALERT, RING,
    ANSWER, ANSWERED, BYE, CallFailed, ExtensionStatus (CallStatus in format 2.0.0), as a
    PBX with status monitoring on does. False: NewCdr only (tests that count reports)."""
    log_level: str = "warning"
    """uvicorn's log level for the simulator's server."""
    report_transport: str = "http"
    """How reports reach the app servers that log in through API v2.0.0 (the PBX's "Report
    Method"): ``http`` (POSTed to them, as always) or ``tcp`` (their login answers
    ``"transport":"TCP"``; they connect to ``tcp_report_port`` and read the reports there,
    nothing is POSTed to them). v1.x logins know no TCP method: their reports stay HTTP."""
    tcp_report_port: int = 0
    """The PBX's TCP report port (``report_transport="tcp"``); 0 picks a free one, read it
    from ``Simulator.tcp_report_port``."""
    tcp_report_tls: bool = False
    """TLS on the TCP report port, with the simulator's certificate. Off by default: the
    documents speak of a plain "TCP port" and a clear-text login block, nothing of TLS [?]."""
    tcp_login_answer: str = "ami"
    """How the TCP report port answers a login block [?]: ``ami`` (``Response: Success`` or
    ``Response: Error`` and a ``Message:`` line, then an empty line), ``json``
    (``{"status":"Success"}`` or ``{"status":"Failed","errno":"20003"}``, one line) or
    ``silent`` (no answer: reports simply follow; a refusal just closes)."""
    tcp_framing: str = "newline"
    """How reports follow each other on the TCP connection [?]: ``newline`` (one JSON object
    per line), ``blank-line`` (each followed by ``\\r\\n\\r\\n``) or ``concatenated``
    (objects back to back, nothing between)."""
