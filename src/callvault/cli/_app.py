"""The Typer app every command module registers itself on."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="callvault",
    help="Keep every call recording of a Yeastar S-Series PBX: fetch, archive, search, play.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from callvault import __version__

        print(f"callvault {__version__}")
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


def _first_command(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def run(argv: list[str]) -> None:
    """Register the command named in `argv` (or all of them) and run the app."""
    from callvault.cli._commands import register

    register(_first_command(argv))
    app()
