"""A PBX under test, of each kind `callvault serve` archives: what an archiver test needs of
it, whatever API it speaks.

* ``s-series``: the S-Series simulator (`Simulator`), reports pushed to serve's receiver.
* ``cloud``: the same simulator as the Yeastar Cloud PBX (``kind="cloud"``: the same API,
  its login also answers a refresh token); serve is told ``CALLVAULT_KIND=cloud``.
* ``p-series``: the P-Series simulator (`PSeriesSimulator`, the OpenAPI); serve takes its
  events from the PBX's WebSocket, its Client ID and Secret as user name and password.

Start one with :func:`start_pbx` (a context manager) and the test's S-Series `Faults`;
each kind switches on the nearest faults it has (see :func:`pseries_faults`).

    with start_pbx("p-series", seed=seed, faults=faults, workdir=tmp_path) as pbx:
        serve = ServeProcess(pbx.serve_env(archive, free_port(), db_url), logs)
        name = pbx.place_random_call(answered=True)  # its recording's name
        ...  # pbx.reboot(), pbx.recording_names(), pbx.recording_sha256(name), pbx.secret

The in-process archiver's tests (test_archive_service, test_archive_backfill) use the rest:
``pbx.archiver_config(archive, ...)`` (as `support.archive.archiver_config`),
``pbx.cli_env(archive, db_url)`` (as `support.archive.cli_env`), ``pbx.place_call(...)``,
``pbx.wait_events_ready()`` (a P-Series PBX sends events only to the WebSockets
subscribed at the time), ``pbx.faults`` (the live fault switches: ``drop_next_downloads``,
``error_5xx_next``, ``html_error_next`` and ``slow_seconds`` exist on both),
``pbx.repeat_new_cdr(...)``, ``pbx.revoke_tokens()``, ``pbx.pbx_logins`` and
``pbx.cdr_reads()``.

The worker pool's tests (test_archive_workers) download with the kind's own API client
class: ``pbx.client(max_attempts=1)`` (a `PbxClient` or `PSeriesClient`, the certificate
pinned, not yet opened: ``async with``), ``pbx.client(secret="wrong")`` one the PBX
refuses.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol, cast

import httpx
import pytest

from callvault.archive import Archiver, ArchiverConfig
from callvault.keys import create_key_file
from callvault.pbx import (
    CallDetail,
    EventFormat,
    MemoryTokenStore,
    PbxClient,
    PSeriesClient,
    TlsOptions,
)
from callvault.simulator import (
    Faults,
    PSeriesConfig,
    PSeriesFaults,
    PSeriesSimulator,
    Simulator,
    SimulatorConfig,
)
from callvault.simulator._events import newcdr_body
from support.archive import (
    archiver_config,
    cli_env,
    login_env,
    outer_env,
    serve_env,
    wait_until,
)

KINDS = ("s-series", "cloud", "p-series")


def kind_params(**marks: pytest.MarkDecorator) -> list[object]:
    """One pytest parameter per kind, id the kind's name; `marks` by kind, with the
    underscore for the dash (``p_series=pytest.mark.xfail(...)``)."""
    return [
        pytest.param(kind, id=kind, marks=[marks[kind.replace("-", "_")]])
        if kind.replace("-", "_") in marks
        else pytest.param(kind, id=kind)
        for kind in KINDS
    ]


class PbxUnderTest(Protocol):
    """What an archiver test needs of a running PBX, of any kind."""

    kind: str

    @property
    def secret(self) -> str:
        """The password (S-Series, Cloud) or Client Secret (P-Series): never to be logged."""
        ...

    def place_random_call(self, *, answered: bool) -> str | None:
        """A plausible call that has just ended; its recording's name (None: not recorded)."""
        ...

    def reboot(self) -> None:
        """The PBX restarts: its tokens (and WebSocket) are gone."""
        ...

    def recording_names(self) -> list[str]: ...

    def recording_sha256(self, name: str) -> str: ...

    def serve_env(
        self, archive: Path, events_port: int, db_url: str | None = None
    ) -> dict[str, str]:
        """The environment of a `callvault serve` child against this PBX, delays shrunk."""
        ...

    @property
    def serial(self) -> str: ...

    @property
    def timezone(self) -> str: ...

    @property
    def faults(self) -> Faults | PSeriesFaults:
        """The live fault switches of the running PBX."""
        ...

    @property
    def pbx_logins(self) -> int:
        """Logins the PBX granted (S-Series ``login``, P-Series ``get_token``)."""
        ...

    def place_call(
        self,
        *,
        call_from: str | None = None,
        call_to: str | None = None,
        call_type: str | None = None,
        talk_seconds: int = 3,
        status: str | None = None,
    ) -> str | None:
        """A call that has just ended; its recording's name (None: not recorded). What is
        not given is the simulator's own default."""
        ...

    def archiver_config(self, archive: Path, **overrides: object) -> ArchiverConfig:
        """An in-process archiver for this PBX (see `support.archive.archiver_config`)."""
        ...

    def wait_events_ready(self) -> bool:
        """Wait until a running archiver will hear of the next call."""
        ...

    def repeat_new_cdr(self, name: str, archiver: Archiver, times: int) -> None:
        """The NewCdr of the recording `name` reaches the archiver `times` times more."""
        ...

    def revoke_tokens(self) -> None:
        """The PBX forgets its tokens, without telling anyone (no reboot)."""
        ...

    def cli_env(self, archive: Path, db_url: str | None = None) -> dict[str, str]:
        """CALLVAULT_* settings of `backfill` against this PBX (`support.archive.cli_env`)."""
        ...

    def cdr_reads(self) -> int:
        """How many reads of the call history the PBX answered (S-Series: CDR exports)."""
        ...

    def client(self, *, secret: str | None = None, **options: Any) -> PbxClient | PSeriesClient:
        """The kind's API client against this PBX (its certificate pinned), not yet opened;
        `secret` instead of the right password (Client Secret); `options` are keywords the
        two clients share (``max_attempts``, ``backoff_base``, ``timeout``...)."""
        ...


class SSeriesPbx:
    """The S-Series simulator, as an S-Series PBX or (``kind="cloud"``) the Cloud PBX."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.kind = sim.config.kind
        self.calls: dict[str, CallDetail] = {}  # placed by place_call, by recording name

    @property
    def secret(self) -> str:
        return self.sim.password

    @property
    def serial(self) -> str:
        return self.sim.serial

    @property
    def timezone(self) -> str:
        return self.sim.config.timezone

    @property
    def faults(self) -> Faults:
        return self.sim.faults

    @property
    def pbx_logins(self) -> int:
        return self.sim.login_count

    def place_call(
        self,
        *,
        call_from: str | None = None,
        call_to: str | None = None,
        call_type: str | None = None,
        talk_seconds: int = 3,
        status: str | None = None,
    ) -> str | None:
        given = {"callfrom": call_from, "callto": call_to, "type": call_type, "status": status}
        fields = {k: v for k, v in given.items() if v is not None}
        cdr = self.sim.place_call(talk_seconds=talk_seconds, **fields)  # type: ignore[arg-type]
        if cdr.recording is not None:
            self.calls[cdr.recording] = cdr
        return cdr.recording

    def archiver_config(self, archive: Path, **overrides: object) -> ArchiverConfig:
        if self.kind != "s-series":  # s-series: the config's default, left as ever
            overrides.setdefault("kind", self.kind)
        return archiver_config(self.sim, archive, **overrides)

    def wait_events_ready(self) -> bool:
        return True  # the archiver's login at start told the PBX where to post its reports

    def repeat_new_cdr(self, name: str, archiver: Archiver, times: int) -> None:
        # Posted to the archiver's receiver, as the PBX re-sends a report.
        body = newcdr_body(self.calls[name], EventFormat.V1_0_2)
        for _ in range(times):
            assert httpx.post(archiver.events_url, content=body).status_code == 200

    def revoke_tokens(self) -> None:
        self.sim.revoke_tokens()

    def cli_env(self, archive: Path, db_url: str | None = None) -> dict[str, str]:
        env = cli_env(self.sim, archive, db_url)
        if self.kind != "s-series":
            env["CALLVAULT_KIND"] = self.kind
        return env

    def cdr_reads(self) -> int:
        return sum(1 for endpoint, _ in self.sim.request_log if endpoint == "cdr/get_random")

    def client(self, *, secret: str | None = None, **options: Any) -> PbxClient:
        # The Cloud PBX speaks the S-Series API (its login also answers a refresh token).
        sim = self.sim
        tls = TlsOptions(pin_sha256=sim.cert_sha256)
        password = sim.password if secret is None else secret
        return PbxClient(sim.url, sim.username, password, tls=tls, **options)

    def place_random_call(self, *, answered: bool) -> str | None:
        # The simulator's own seeded generator (as the test always did).
        return self.sim.place_random_call(answered=answered).recording

    def reboot(self) -> None:
        self.sim.reboot()

    def recording_names(self) -> list[str]:
        return self.sim.recording_names()

    def recording_sha256(self, name: str) -> str:
        return self.sim.recording_sha256(name)

    def serve_env(
        self, archive: Path, events_port: int, db_url: str | None = None
    ) -> dict[str, str]:
        env = serve_env(self.sim, archive, events_port, db_url)
        if self.kind != "s-series":  # s-series: serve's default, left unset as ever
            env["CALLVAULT_KIND"] = self.kind
        return env


class PSeriesPbx:
    """The P-Series simulator. Its random calls come from a generator seeded with the
    test's seed and used by the caller only (the simulator's own one also draws the
    faults, in an order that depends on the scheduling)."""

    kind = "p-series"

    def __init__(self, sim: PSeriesSimulator, seed: int, key_file: Path) -> None:
        self.sim = sim
        self.key_file = key_file
        self._rng = random.Random(f"{seed}-p-series-calls")

    @property
    def secret(self) -> str:
        return self.sim.client_secret

    @property
    def serial(self) -> str:
        return self.sim.serial

    @property
    def timezone(self) -> str:
        return self.sim.config.timezone

    @property
    def faults(self) -> PSeriesFaults:
        return self.sim.faults

    @property
    def pbx_logins(self) -> int:
        return self.sim.get_token_count

    def place_call(
        self,
        *,
        call_from: str | None = None,
        call_to: str | None = None,
        call_type: str | None = None,
        talk_seconds: int = 3,
        status: str | None = None,
    ) -> str | None:
        given = {
            "call_from": call_from,
            "call_to": call_to,
            "call_type": call_type,
            "status": status,
        }
        fields = {k: v for k, v in given.items() if v is not None}
        trunk = "SIP-Provider" if call_type == "Outbound" else ""  # an outbound call's
        call = self.sim.place_call(
            talk_seconds=talk_seconds,
            dst_trunk=trunk,
            **fields,  # type: ignore[arg-type]
        )
        return call.file

    def archiver_config(self, archive: Path, **overrides: object) -> ArchiverConfig:
        """As `support.archive.archiver_config`, every delay shrunk alike, for a P-Series
        PBX: its Client ID and Secret as user name and password. Its events come over the
        WebSocket the archiver opens; no master key, so its tokens are not kept."""
        sim = self.sim
        # archiver_config reads these of an S-Series simulator; the same of this PBX.
        shape = SimpleNamespace(
            url=sim.url,
            username=sim.client_id,
            password=sim.client_secret,
            cert_sha256=sim.cert_sha256,
            config=SimpleNamespace(timezone=sim.config.timezone),
        )
        overrides.setdefault("kind", "p-series")
        return archiver_config(cast(Simulator, shape), archive, **overrides)

    def wait_events_ready(self) -> bool:
        # A P-Series PBX sends an event to the WebSockets subscribed at the time only: the
        # archiver's may still be connecting when it has started.
        return wait_until(lambda: self.sim.ws_subscribers(30012) >= 1, timeout=20)

    def repeat_new_cdr(self, name: str, archiver: Archiver, times: int) -> None:
        # The PBX sends the same 30012 again over the archiver's WebSocket (its receiver
        # takes no unsigned posts: the WebSocket is where a P-Series PBX's events come from).
        assert self.sim.ws_subscribers(30012) >= 1
        self.sim.resend_new_cdr(name, times)

    def revoke_tokens(self) -> None:
        # Every token the PBX issued is deleted (as `del_token` does), without a restart:
        # the WebSocket stays open, the next API call meets 10004.
        state = self.sim.state
        with state.lock:
            for token in list(state.access):
                state.del_token(token)

    def cli_env(self, archive: Path, db_url: str | None = None) -> dict[str, str]:
        sim = self.sim
        login = login_env(
            url=sim.url,
            username=sim.client_id,
            password=sim.client_secret,
            pin=sim.cert_sha256,
            timezone=sim.config.timezone,
            archive=archive,
            db_url=db_url,
        )
        return {"CALLVAULT_KIND": "p-series", **login}

    def cdr_reads(self) -> int:
        """The ``cdr/search`` requests of the history's windows: the client's first
        ``cdr/search`` of each run follows its ``cdr/list`` and learns the PBX's time
        filters (a search for the newest call), it reads no window; not counted."""
        log = self.sim.request_log
        searches = sum(1 for path, _ in log if path.endswith("/cdr/search"))
        return searches - sum(1 for path, _ in log if path.endswith("/cdr/list"))

    def client(self, *, secret: str | None = None, **options: Any) -> PSeriesClient:
        """Its tokens in a store of its own (not the process's shared one for this PBX):
        a client with a wrong secret is refused, not handed another client's token."""
        sim = self.sim
        tls = TlsOptions(pin_sha256=sim.cert_sha256)
        password = sim.client_secret if secret is None else secret
        options.setdefault("token_store", MemoryTokenStore())
        return PSeriesClient(sim.url, sim.client_id, password, tls=tls, **options)

    def place_random_call(self, *, answered: bool) -> str | None:
        """Internal, inbound from a mobile or outbound, as the S-Series simulator's
        `place_random_call` makes them; unanswered ones with one of the PBX's statuses."""
        rng = self._rng
        kind = rng.choices(["Internal", "Inbound", "Outbound"], weights=[3, 4, 3])[0]
        ext = str(rng.randint(1000, 1020))
        other = str(rng.randint(1000, 1020))
        mobile = f"0151{rng.randint(10_000_000, 99_999_999)}"
        status = "ANSWERED" if answered else rng.choice(["NO ANSWER", "BUSY", "FAILED"])
        talk = rng.randint(2, 40)
        ring = rng.randint(1, 15)
        call_from, call_to = {
            "Internal": (ext, other),
            "Inbound": (mobile, ext),
            "Outbound": (ext, mobile),
        }[kind]
        call = self.sim.place_call(
            call_from=call_from,
            call_to=call_to,
            call_type=kind,
            talk_seconds=talk,
            ring_seconds=ring,
            status=status,
            record=True,
            did_number="0301234567" if kind == "Inbound" else "",
            src_trunk="SIP-Provider" if kind == "Inbound" else "",
            dst_trunk="SIP-Provider" if kind == "Outbound" else "",
        )
        return call.file

    def reboot(self) -> None:
        self.sim.restart()

    def recording_names(self) -> list[str]:
        return self.sim.recording_names()

    def recording_sha256(self, name: str) -> str:
        return self.sim.recording_sha256(name)

    def serve_env(
        self, archive: Path, events_port: int, db_url: str | None = None
    ) -> dict[str, str]:
        """As `support.archive.serve_env`, delays shrunk alike, for the P-Series PBX: its
        Client ID and Secret as user name and password. With the master key at hand (as
        for any registered P-Series PBX), serve keeps the PBX's tokens sealed in the index
        and a restarted run goes on with them instead of spending one more of the eight
        live tokens the API application may hold."""
        sim = self.sim
        env = outer_env()
        env.update(
            {
                "CALLVAULT_KIND": "p-series",
                "CALLVAULT_PBX": sim.url,
                "CALLVAULT_USERNAME": sim.client_id,
                "CALLVAULT_PASSWORD": sim.client_secret,
                "CALLVAULT_PIN_SHA256": sim.cert_sha256 or "",
                "CALLVAULT_ARCHIVE": str(archive),
                "CALLVAULT_TIMEZONE": sim.config.timezone,
                "CALLVAULT_MASTER_KEY_FILE": str(self.key_file),
                # Its receiver takes the PBX's webhooks (none here: events come over
                # the WebSocket); it listens all the same.
                "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{events_port}",
                "CALLVAULT_POLL_INTERVAL_S": "0.3",
                "CALLVAULT_HEARTBEAT_INTERVAL_S": "1",
                "CALLVAULT_RETRY_SCHEDULE_S": "[0.3, 0.5, 1.0]",
                "CALLVAULT_MISSING_AFTER_S": "600",
                "CALLVAULT_TRANSIENT_BACKOFF_S": "0.2",
                "CALLVAULT_TRANSIENT_BACKOFF_MAX_S": "1",
                "CALLVAULT_TRANSIENT_MAX_ATTEMPTS": "100",
                "CALLVAULT_RECONCILE_HOURS": "1",
                "CALLVAULT_RECONCILE_INTERVAL_S": "10",
            }
        )
        if db_url is not None:
            env["CALLVAULT_DB"] = db_url
        return env


def pseries_faults(faults: Faults) -> PSeriesFaults:
    """The P-Series faults nearest to the S-Series `faults`.

    Mapped: ``drop_rate`` (a file GET dropped mid-body), ``error_5xx_rate`` (HTTP 502 with
    an HTML body, under /openapi/), ``slow_seconds``, and ``not_ready_seconds`` as
    ``recording_list_delay_s`` (the recording is unknown to the API for that long after
    its NewCdr). Without a counterpart, so not switched on for a P-Series PBX:
    ``html_error_rate`` (only a counter, ``html_error_next``, exists, on file GETs),
    ``revoke_every_seconds`` (it never forgets its tokens but when it restarts: the
    test's reboot), ``reboot_every_seconds``, ``delete_rate`` and the name and format
    switches of the S-Series API.
    """
    return PSeriesFaults(
        drop_rate=faults.drop_rate,
        error_5xx_rate=faults.error_5xx_rate,
        slow_seconds=faults.slow_seconds,
        recording_list_delay_s=faults.not_ready_seconds,
    )


@contextmanager
def start_pbx(
    kind: str,
    *,
    seed: int,
    faults: Faults,
    workdir: Path,
    event_retry_interval: float = 2.0,
    event_max_retries: int = 10,
) -> Iterator[PbxUnderTest]:
    """A running PBX of `kind` with (the nearest) `faults`, stopped on leaving.

    `event_retry_interval` and `event_max_retries` are how an S-Series or Cloud PBX
    re-sends an unanswered report; a P-Series PBX sends each event once, to the
    WebSockets open at the time. `workdir` holds what serve needs beside the PBX (the
    master key of the P-Series one), outside any archive.
    """
    if kind in ("s-series", "cloud"):
        config = SimulatorConfig(
            kind=kind,
            seed=seed,
            faults=faults,
            event_retry_interval=event_retry_interval,
            event_max_retries=event_max_retries,
        )
        with Simulator(config) as sim:
            yield SSeriesPbx(sim)
        return
    if kind == "p-series":
        key_file = workdir / "master.key"
        create_key_file(key_file)
        with PSeriesSimulator(PSeriesConfig(seed=seed, faults=pseries_faults(faults))) as psim:
            yield PSeriesPbx(psim, seed, key_file)
        return
    raise ValueError(f"unknown PBX kind {kind!r}")
