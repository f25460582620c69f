"""The `callvault` command line: argument parsing and wiring only.

Each command group lives in its own module and registers itself on `app`; the work is
done by library functions in the layers below (see DESIGN.md).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="callvault",
    help="Keep every call recording of a Yeastar S-Series PBX: fetch, archive, search, play.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from callvault.cli import _commands  # noqa: F401


def main() -> None:
    _register()
    app()
