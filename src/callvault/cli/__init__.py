"""The `callvault` command line: argument parsing and wiring only.

Each command group lives in its own module and registers itself on `app`; the work is
done by library functions in the layers below (see DESIGN.md).
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="callvault",
    help="Keep every call recording of a Yeastar S-Series PBX: fetch, archive, search, play.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"callvault {version('callvault')}")  # as installed (pyproject.toml)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Keep every call recording of a Yeastar S-Series PBX: fetch, archive, search, play."""
    # A callback keeps `callvault COMMAND` a command group even when main() registered
    # only the one command being run.


def _register() -> None:
    """Register every command (for tests that drive `app` in-process)."""
    from callvault.cli._commands import register

    register(None)


def _first_command(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    import sys

    from callvault.cli._commands import register

    register(_first_command(sys.argv[1:]))
    try:
        app()
    except Exception as exc:
        # A damaged index is found by whatever query reads the damaged page first: one line
        # (what is wrong, how to check, restore a backup) instead of a traceback. Looked up
        # in sys.modules: commands that never open the index must not import it for this.
        index = sys.modules.get("callvault.index")
        if index is None or not isinstance(exc, index.IndexFailure):
            raise
        print(f"callvault: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
