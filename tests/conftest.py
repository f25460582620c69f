"""Fixtures shared by every test module."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

# Fixtures of the helper package tests/support (plain modules; no test module imports
# another): `connect` (a fake PBX over real HTTP) and `sim` (the simulator over HTTPS).
pytest_plugins = ["support.pbx_fakes", "support.pbx_sim"]

# Settings of the test suite itself (CALLVAULT_TEST_PG_URL, CALLVAULT_TEST_SEED), not of
# callvault: these are read from the outer environment on purpose.
_TEST_SETTINGS_PREFIX = "CALLVAULT_TEST_"


@pytest.fixture(autouse=True)
def _no_callvault_settings_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CALLVAULT_* variable of the developer's shell (CALLVAULT_PBX, CALLVAULT_PASSWORD,
    CALLVAULT_EVENTS_LISTEN...) must not reach the commands under test: with it, `serve`
    could log in to a real PBX or listen on another address than 127.0.0.1. Every test
    starts without them; a test sets what it needs itself."""
    for name in list(os.environ):
        if name.upper().startswith("CALLVAULT_") and not name.upper().startswith(
            _TEST_SETTINGS_PREFIX
        ):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _restore_callvault_logging() -> Iterator[None]:
    """Commands run in-process (CliRunner) point the `callvault` logger at the stderr of
    their run; put it back so a later test does not log into a closed stream."""
    loggers = [logging.getLogger(name) for name in ("callvault", "callvault.pbx")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
