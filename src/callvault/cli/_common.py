"""Helpers shared by the commands: one-line errors, never a traceback for expected failures."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line saying what went wrong (and what to do) on stderr and exit."""
    print(f"callvault: error: {message}", file=sys.stderr)
    raise typer.Exit(code)
