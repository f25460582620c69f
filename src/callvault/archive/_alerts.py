"""Alerts: tell a person when something needs one, by webhook and by e-mail.

Every `serve` node runs an `Alerter` that looks, every half minute, for:

- a PBX whose session has been in error (unreachable, a refused password, a lockout) for
  `pbx_down_after_s` (10 minutes): ``pbx:NAME:down``;
- a recording given up on (`failed` or `missing`): ``recording:ID``, told at once, all
  those of one round in one message;
- a node that stopped sending its heartbeat without stopping cleanly (killed, its machine
  gone) for `node_gone_after_s` (a minute): ``node:NAME:gone``;
- storage this node cannot use (a bucket that does not answer, a full disk) for a minute:
  ``storage:NODE:failing``.

Each is told once, and told again as cleared once it no longer holds, whichever and
however many nodes evaluate (`index.alerts`: conditional updates in the shared index).
A message that cannot be delivered is logged and tried again at the next round.

Deliveries: a webhook (a POST of JSON: ``{"status": "firing"|"resolved", "alerts":
[{"key", "summary", "detail", "since", "at"}], "node"}``, any 2xx is delivered) and SMTP
e-mail (one message per round and status, STARTTLS and login if configured). Neither
carries a password, token or secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import logging
import smtplib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx

from callvault.archive._process import NODE_KIND
from callvault.archive._session import PASSWORD_UNOPENED
from callvault.index import Alert, Index
from callvault.storage import Storage

log = logging.getLogger("callvault.archive")

DEFAULT_INTERVAL_S = 30.0
FIRING, RESOLVED = "firing", "resolved"
# A node row whose heartbeat stopped longer ago than this is history, not an alert.
_NODE_HISTORY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Where alerts go and when conditions count (the CLI builds it from the settings)."""

    webhook_url: str | None = field(default=None, repr=False)  # its path may be a secret
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    email_from: str = "callvault@localhost"
    email_to: tuple[str, ...] = ()
    pbx_down_after_s: float = 600.0
    node_gone_after_s: float = 60.0
    storage_failing_after_s: float = 60.0
    interval_s: float = DEFAULT_INTERVAL_S
    timeout_s: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.webhook_url) or bool(self.smtp_host and self.email_to)


@dataclass(frozen=True, slots=True)
class Notice:
    """One message to send: alerts that fired, or cleared, in one round."""

    status: str  # FIRING or RESOLVED
    alerts: tuple[Alert, ...]

    def subject(self) -> str:
        word = "FIRING" if self.status == FIRING else "RESOLVED"
        first = self.alerts[0].summary
        more = f" (and {len(self.alerts) - 1} more)" if len(self.alerts) > 1 else ""
        return f"[callvault] {word}: {first}{more}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Alerter:
    """Evaluates the conditions and delivers what changed (see the module docstring)."""

    def __init__(
        self,
        index: Index,
        storage: Storage,
        settings: AlertSettings,
        *,
        node: str,
        clock: Callable[[], datetime] = _utcnow,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._index = index
        self._storage = storage
        self.settings = settings
        self.node = node
        self._clock = clock
        self._transport = transport

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate and deliver every `interval_s` seconds until `stop` is set."""
        while not stop.is_set():
            await asyncio.to_thread(self.round)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.interval_s)

    def round(self) -> list[Notice]:
        """One evaluation and its deliveries (blocking); the notices delivered."""
        notices = self.evaluate()
        sent = []
        for notice in notices:
            if self.deliver(notice):
                sent.append(notice)
            elif notice.status == FIRING:
                for alert in notice.alerts:  # tell it again next round
                    if alert.fired_at is not None:
                        self._index.alerts.unclaim(alert.key, fired_at=alert.fired_at)
        return sent

    # -- the conditions --------------------------------------------------------------------

    def conditions(self, now: datetime) -> dict[str, tuple[str, str, float]]:
        """What holds now: key -> (summary, detail, seconds it must last to be told)."""
        s = self.settings
        found: dict[str, tuple[str, str, float]] = {}
        for record in self._index.pbxs.list():
            health = record.session or {}
            if health.get("state") == "error":
                error = str(health.get("error") or "no error given")
                left_out = health.get("reason") == PASSWORD_UNOPENED
                found[f"pbx:{record.name}:down"] = (
                    f"PBX {record.name} is not archived: a node cannot open its password"
                    if left_out
                    else f"PBX {record.name} cannot be reached or refuses the login",
                    f"{error}; last contact: {health.get('last_success_at') or 'never'}",
                    s.pbx_down_after_s,
                )
        for row in self._index.recordings.recent_failures(200):
            found[f"recording:{row.id}"] = (
                f"recording {row.name} was given up on ({row.state})",
                f"{row.last_error or 'no reason kept'}; queue it again with `callvault requeue` "
                "once the cause is fixed",
                0.0,
            )
        for info in self._index.processes.not_stopped(kind=NODE_KIND):
            silent = now - info.heartbeat_at
            if timedelta(seconds=s.node_gone_after_s) <= silent <= _NODE_HISTORY:
                found[f"node:{info.node}:gone"] = (
                    f"node {info.node} stopped without shutting down",
                    f"no heartbeat since {info.heartbeat_at.isoformat()} (host "
                    f"{info.hostname}, pid {info.pid}); its PBXs went to the other nodes",
                    0.0,
                )
        problem = self._storage_problem()
        if problem is not None:
            found[f"storage:{self.node}:failing"] = (
                f"node {self.node} cannot store recordings",
                problem,
                s.storage_failing_after_s,
            )
        return found

    def _storage_problem(self) -> str | None:
        try:
            return self._storage.check()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def evaluate(self) -> list[Notice]:
        """Note what holds, claim what is due to be told, clear what no longer holds; the
        notices this node must deliver."""
        now = self._clock()
        store = self._index.alerts
        held = self.conditions(now)
        fired: list[Alert] = []
        for key, (summary, detail, after_s) in held.items():
            store.seen(key, summary=summary, detail=detail, now=now)
            alert = store.claim_firing(key, now=now, after=timedelta(seconds=after_s))
            if alert is not None:
                fired.append(alert)
        cleared: list[Alert] = []
        for alert in store.open():
            if alert.key in held or not self._mine_to_judge(alert.key):
                continue
            if alert.key.startswith("recording:") and self._still_given_up(alert.key):
                continue  # older than the failures listed this round
            done = store.clear(alert.key, now=now)
            if done is not None:
                cleared.append(done)
        notices = []
        if fired:
            notices.append(Notice(FIRING, tuple(fired)))
        if cleared:
            notices.append(Notice(RESOLVED, tuple(cleared)))
        return notices

    def _mine_to_judge(self, key: str) -> bool:
        """A node judges every condition but another node's storage."""
        return not key.startswith("storage:") or key == f"storage:{self.node}:failing"

    def _still_given_up(self, key: str) -> bool:
        try:
            row = self._index.recordings.by_id(int(key.split(":", 1)[1]))
        except ValueError:
            return False
        return row is not None and row.state in ("failed", "missing")

    # -- delivery ----------------------------------------------------------------------------

    def deliver(self, notice: Notice) -> bool:
        """Send `notice` everywhere configured; True if every delivery succeeded."""
        ok = True
        s = self.settings
        if s.webhook_url:
            ok = self._webhook(notice) and ok
        if s.smtp_host and s.email_to:
            ok = self._email(notice) and ok
        return ok

    def payload(self, notice: Notice) -> dict[str, Any]:
        """The webhook's JSON body."""

        def at(alert: Alert) -> str | None:
            moment = alert.fired_at if notice.status == FIRING else alert.resolved_at
            return moment.isoformat() if moment is not None else None

        return {
            "status": notice.status,
            "node": self.node,
            "alerts": [
                {
                    "key": alert.key,
                    "summary": alert.summary,
                    "detail": alert.detail,
                    "since": alert.first_seen_at.isoformat(),
                    "at": at(alert),
                }
                for alert in notice.alerts
            ],
        }

    def _webhook(self, notice: Notice) -> bool:
        url = self.settings.webhook_url
        assert url is not None
        try:
            with httpx.Client(
                timeout=self.settings.timeout_s, transport=self._transport, trust_env=False
            ) as client:
                answer = client.post(url, json=self.payload(notice))
        except httpx.HTTPError as exc:
            log.warning("the alert webhook could not be reached (%s); trying again", exc)
            return False
        if not answer.is_success:
            log.warning(
                "the alert webhook answered HTTP %d; trying again next round", answer.status_code
            )
            return False
        return True

    def _email(self, notice: Notice) -> bool:
        s = self.settings
        assert s.smtp_host is not None
        # Python folds a long subject before its first word, which readers show as a
        # leading space: lines up to the 998 characters the RFC allows are not folded.
        message = EmailMessage(policy=email.policy.SMTP.clone(max_line_length=998))
        message["From"] = s.email_from
        message["To"] = ", ".join(s.email_to)
        message["Subject"] = notice.subject()
        message.set_content(_email_body(notice, self.node))
        try:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_s) as smtp:
                if s.smtp_starttls:
                    smtp.starttls()
                if s.smtp_user:
                    smtp.login(s.smtp_user, s.smtp_password or "")
                smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as exc:
            reason = type(exc).__name__ if isinstance(exc, smtplib.SMTPAuthenticationError) else exc
            log.warning("the alert e-mail could not be sent (%s); trying again", reason)
            return False
        return True


def _email_body(notice: Notice, node: str) -> str:
    lines = []
    for alert in notice.alerts:
        lines.append(f"{notice.status.upper()}: {alert.summary}")
        lines.append(f"  {alert.detail}")
        lines.append(f"  since {alert.first_seen_at:%Y-%m-%d %H:%M:%S} UTC ({alert.key})")
        lines.append("")
    lines.append(f"-- callvault, node {node}")
    return "\n".join(lines)
