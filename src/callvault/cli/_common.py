"""Helpers shared by the commands: one-line errors, never a traceback for expected failures."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import typer

T = TypeVar("T")


def cli_actor() -> str:
    """Who the audit log names for a change made on the command line: ``cli:<OS user>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line saying what went wrong (and what to do) on stderr and exit."""
    print(f"callvault: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


class Terminated(Exception):
    """SIGTERM arrived while `run_terminable` ran; the work was cancelled and cleaned up."""


def run_terminable(work: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(work)`, with SIGTERM cancelling it as Ctrl-C does.

    Without this, SIGTERM (what `kill`, systemd and container runtimes send) ends the
    process at once, and a download in progress leaves its temporary file behind. With it,
    the work is cancelled, cleans up like after Ctrl-C, and `Terminated` is raised.
    """
    terminated = False

    async def main() -> T:
        nonlocal terminated
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
            handled = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            handled = False
        try:
            return await work
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
