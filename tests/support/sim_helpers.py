"""Shared helpers for the simulator tests: a thin API caller and a small event receiver.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from callvault.simulator import Simulator, SimulatorConfig

PASSWORD = "s3cret-pass"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def trusting_context(sim: Simulator) -> ssl.SSLContext:
    assert sim.ca_file is not None
    return ssl.create_default_context(cafile=str(sim.ca_file))


@dataclass
class Pbx:
    """A running simulator and an httpx client that trusts its certificate."""

    sim: Simulator
    client: httpx.Client

    def call(
        self,
        endpoint: str,
        *,
        version: str = "v1.1.0",
        token: str | None = None,
        body: Any = None,
        content: bytes | None = None,
        method: str = "POST",
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        query = dict(params or {})
        if token is not None:
            query["token"] = token
        kwargs: dict[str, Any] = {"params": query}
        if content is not None:
            kwargs["content"] = content
        elif body is not None:
            kwargs["json"] = body
        return self.client.request(method, f"{self.sim.url}/api/{version}/{endpoint}", **kwargs)

    def ok(self, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        response = self.call(endpoint, **kwargs)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        assert data["status"] == "Success", data
        return data

    def errno(self, endpoint: str, **kwargs: Any) -> str:
        response = self.call(endpoint, **kwargs)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        data = response.json()
        assert data["status"] == "Failed", data
        assert isinstance(data["errno"], str)
        return str(data["errno"])

    def login(self, *, api: str = "v1.1.0", port: str | int = "0", **extra: Any) -> str:
        """Log in through API path version `api`; `extra` goes into the body (e.g. version)."""
        body = {"username": "api", "password": md5(PASSWORD), "port": port, **extra}
        token = self.ok("login", version=api, body=body)["token"]
        assert isinstance(token, str)
        return token

    def random(self, token: str, name: str, *, version: str = "v1.1.0", **extra: str) -> str:
        data = self.ok(
            "recording/get_random", version=version, token=token, body={"recording": name, **extra}
        )
        assert data["recording"] == name
        value = data["random"]
        assert isinstance(value, str)
        return value

    def download(
        self, token: str, name: str, random: str, *, version: str = "v1.1.0"
    ) -> httpx.Response:
        return self.call(
            "recording/download",
            version=version,
            method="GET",
            params={"recording": name, "random": random, "token": token},
        )


def make_config(**changes: Any) -> SimulatorConfig:
    base: dict[str, Any] = {
        "password": PASSWORD,
        "seed": 7,
        "event_retry_interval": 0.05,
        "event_max_retries": 3,
        # NewCdr (and BootUp) only: the tests count reports; test_sim_progress turns them on.
        "call_progress_reports": False,
    }
    base.update(changes)
    return SimulatorConfig(**base)


def running_pbx(**changes: Any) -> Iterator[Pbx]:
    """Body of a `pbx` fixture: a fresh simulator (test config plus `changes`) and a client."""
    with (
        Simulator(make_config(**changes)) as sim,
        httpx.Client(verify=trusting_context(sim)) as client,
    ):
        yield Pbx(sim, client)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """An app server on 127.0.0.1 that records the reports POSTed to it.

    `statuses` are answered in turn; once they run out every report gets 200.
    """

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self
        self._lock = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver._lock.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.received) >= count, timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def running_receiver() -> Iterator[Receiver]:
    """Body of a `receiver` fixture."""
    rec = Receiver()
    yield rec
    rec.close()
