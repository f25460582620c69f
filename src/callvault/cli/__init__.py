"""The `callvault` command line: argument parsing and wiring only.

Each command group lives in its own module and registers itself on the Typer `app` of
`callvault.cli._app`; the work is done by library functions in the layers below. Starting
up is kept cheap: `main()` answers ``--version`` before importing anything, and imports
only the module of the command being run (all of them for ``--help``).
"""

from __future__ import annotations

from typing import Any


def main() -> None:
    """The `callvault` console script."""
    import sys

    argv = sys.argv[1:]
    if argv[:1] == ["--version"]:
        from callvault import __version__

        print(f"callvault {__version__}")
        return
    from callvault.cli._app import run

    try:
        run(argv)
    finally:
        # The interpreter's teardown would collect every object still tracked, modules and
        # all, which are freed anyway when the process ends: frozen, they are left to it
        # (`callvault list` 100 ms sooner; atexit handlers and buffered output still run).
        import gc

        gc.freeze()


def _register() -> None:
    """Register every command (for tests that drive `app` in-process)."""
    from callvault.cli._commands import register

    register(None)


def __getattr__(name: str) -> Any:
    # `from callvault.cli import app` (tests, docs generator) without paying for Typer in
    # `callvault --version`.
    if name == "app":
        from callvault.cli._app import app

        return app
    raise AttributeError(name)
