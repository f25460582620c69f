"""The Typer app every command module registers itself on."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer


def _keep_hyphenated_words_whole() -> None:
    """Help screens never break a line inside a hyphenated word: the formats people type
    (YYYY-MM-DD, --since) stay whole. Typer's click (its own copy, `typer._click`) wraps
    help with a TextWrapper it looks up in its `_textwrap` module each time; if a later
    Typer moves it, help still works, only wrapped with breaks at hyphens."""
    try:
        from typer._click import _textwrap  # type: ignore[attr-defined, unused-ignore]
    except ImportError:  # pragma: no cover - a Typer without its own click
        return
    base = getattr(_textwrap, "TextWrapper", None)
    if base is None or getattr(base, "_callvault", False):
        return

    class HelpWrapper(base):  # type: ignore[misc, valid-type]
        _callvault = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("break_on_hyphens", False)
            super().__init__(*args, **kwargs)

    setattr(_textwrap, "TextWrapper", HelpWrapper)  # noqa: B010 - a module attribute


_keep_hyphenated_words_whole()

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
