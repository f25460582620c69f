"""Helpers shared by the commands: one-line errors, never a traceback for expected failures,
and the one way commands answer SIGTERM and Ctrl-C.

Signals, in two shapes (SIGTERM is what `kill`, systemd and container runtimes send):

* a **service** (`serve`, `web`, `demo`, `simulate`) runs with `run_service(main)`: the first
  SIGTERM or Ctrl-C asks it to stop (`stop` is set; it finishes what is in flight and
  returns, exit 0); a second one cancels it at once;
* a **batch command** (`fetch`, `backfill`) runs with `run_terminable(work)`: SIGTERM cancels
  the work as Ctrl-C does, it cleans up, and the command exits 143 (130 for Ctrl-C).
"""

from __future__ import annotations

import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    import asyncio

    from rich.progress import Progress

T = TypeVar("T")


def cli_actor() -> str:
    """Who the audit log names for a change made on the command line: ``cli:<OS user>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def command_name() -> str:
    """How to run callvault from another terminal: plain `callvault` when that is the one
    on the PATH, else its full path (a virtual environment that is not activated)."""
    here = Path(sys.executable).parent / "callvault"
    found = shutil.which("callvault")
    if found is not None and here.exists() and Path(found).resolve() == here.resolve():
        return "callvault"
    if here.exists():
        return shlex.quote(str(here))
    return f"{shlex.quote(sys.executable)} -m callvault"


def plural(count: int, one: str) -> str:
    """ "1 call", "2 calls": a count with its noun, as people write it."""
    return f"{count} {one}{'' if count == 1 else 's'}"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line saying what went wrong (and what to do) on stderr and exit."""
    print(f"callvault: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Terminated(Exception):
    """SIGTERM arrived while `run_terminable` ran; the work was cancelled and cleaned up."""


def run_terminable(work: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(work)`, with SIGTERM cancelling it as Ctrl-C does.

    Without this, SIGTERM (what `kill`, systemd and container runtimes send) ends the
    process at once, and a download in progress leaves its temporary file behind. With it,
    the work is cancelled, cleans up like after Ctrl-C, and `Terminated` is raised.
    """
    import asyncio

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


def _freeze_what_started() -> None:
    """Keep the objects a service made to start (modules, the app, the index's tables) out
    of the garbage collector's passes from now on (`gc.freeze`).

    A full pass walks every object tracked; a search that brings in thousands of rows set
    one off every few requests, and it walked the whole application each time: 35 ms more
    on one search in six (p95 94 ms against a median of 56 at ten million calls, 64 with
    this). Collected garbage of the start-up goes first.
    """
    import gc

    gc.collect()
    gc.freeze()


def run_service(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, T]],
    *,
    ready: Callable[[], None] | None = None,
) -> T:
    """`asyncio.run(main(stop))` for a long-running command: the first SIGTERM or Ctrl-C
    sets `stop` (the service shuts down in its own order and returns), a second one
    cancels it at once and raises `Terminated`. `ready()` runs once the signals are
    handled: print "serving..." there, so whoever waits for that line may signal at once."""
    import asyncio

    forced = False

    async def runner() -> T:
        nonlocal forced
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stop = asyncio.Event()

        def on_signal() -> None:
            nonlocal forced
            if stop.is_set():
                forced = True
                task.cancel()
            stop.set()

        installed = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, on_signal)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        try:
            _freeze_what_started()
            if ready is not None:
                ready()
            return await main(stop)
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    try:
        return asyncio.run(runner())
    except asyncio.CancelledError:
        if forced:
            raise Terminated from None
        raise


def counting_bar(*, quiet: bool = False) -> Progress:
    """The progress bar of the long commands (migrate, copy, backfill): a description, a
    bar, done of total and the time taken, on stderr; off when `quiet` or when stderr is
    not a terminal (a script's log gets no bar)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )
