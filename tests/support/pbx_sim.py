"""The simulated PBX over real HTTPS on 127.0.0.1, for the test_pbx_* modules.

The simulator is a separate implementation of the protocol (it shares only data types with
the client), so tests against it check the client against the rules, not against itself.
The fixture `sim` is registered in tests/conftest.py; `sim_client` builds a client that
trusts it by its pin. To act between two requests of the client (expire a random, delete
a file), `after_sim_answer` hooks the simulator's own handler, so the client under test
keeps its production paths (no injected transport).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.requests import Request

from callvault.pbx import PbxClient, TlsOptions
from callvault.simulator import Simulator, SimulatorConfig
from callvault.simulator._app import Outcome, PbxHttp
from support.pbx_fakes import Sleeps

SIM_PASSWORD = "integration-Pa55"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A running simulator with API password SIM_PASSWORD, over HTTPS on 127.0.0.1."""
    with Simulator(SimulatorConfig(password=SIM_PASSWORD, seed=7)) as simulator:
        yield simulator


def pinned(sim: Simulator) -> TlsOptions:
    assert sim.cert_sha256 is not None
    return TlsOptions(pin_sha256=sim.cert_sha256)


def sim_client(sim: Simulator, **kwargs: Any) -> PbxClient:
    """A client for `sim`, trusting its certificate by pin; backoffs recorded, not slept."""
    kwargs.setdefault("tls", pinned(sim))
    kwargs.setdefault("sleep", Sleeps())
    return PbxClient(sim.url, sim.username, SIM_PASSWORD, **kwargs)


def outcomes(sim: Simulator, endpoint: str) -> list[str]:
    """How the simulator answered each request to `endpoint`, in order ("Success", an
    errno, "dropped", ...)."""
    return [outcome for name, outcome in sim.request_log if name == endpoint]


def after_sim_answer(
    monkeypatch: pytest.MonkeyPatch, handler: str, hook: Callable[[Request], None]
) -> None:
    """Call `hook(request)` whenever the simulator's `handler` (a method of its PbxHttp,
    e.g. "recording_get_random") has handled a request, successfully or with an errno,
    before the client receives the answer; on the simulator's thread."""
    real = getattr(PbxHttp, handler)

    async def answer_then_hook(http: PbxHttp, request: Request, version: str) -> Outcome:
        try:
            outcome: Outcome = await real(http, request, version)
        finally:
            hook(request)
        return outcome

    monkeypatch.setattr(PbxHttp, handler, answer_then_hook)
