"""Fixtures shared by every test module."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


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
