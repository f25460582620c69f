"""The click group every command module registers itself on.

Why click and not Typer: Typer (0.29) builds a pydantic adapter for every parameter when
it starts, which made every command cost 16 times a bare interpreter's start-up before it
did anything, against click's 5 (bench/cli_startup.py); click is what Typer runs on.
"""

from __future__ import annotations

import sys
from typing import Any

import click


def _keep_hyphenated_words_whole() -> None:
    """Help screens never break a line inside a hyphenated word: the formats people type
    (YYYY-MM-DD, --since) stay whole. Click wraps help with a TextWrapper it looks up in
    its `_textwrap` module each time; if a later click moves it, help still works, only
    wrapped with breaks at hyphens."""
    try:
        from click import _textwrap
    except ImportError:  # pragma: no cover - another click
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

# Help text as wide as the terminal allows (up to 100 columns), whole words only.
CONTEXT_SETTINGS = {"max_content_width": 100, "help_option_names": ["--help", "-h"]}


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from callvault import __version__

        click.echo(f"callvault {__version__}")
        ctx.exit()


@click.group(name="callvault", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the version and exit.",
)
def app() -> None:
    """Keep every call recording of your Yeastar PBXs: fetch, archive, search, play."""


def _first_command(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def run(argv: list[str]) -> None:
    """Register the command named in `argv` (or all of them) and run the app.

    Every failure is one line on stderr, as for the commands' own errors: a usage error
    (exit 2) names the option and where to read about it, instead of click's three lines.
    """
    from callvault.cli._commands import register

    register(_first_command(argv))
    try:
        code = app.main(args=argv, prog_name="callvault", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # `callvault` or `callvault user` alone
        print(exc.format_message())
        raise SystemExit(exc.exit_code) from None
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "callvault"
        print(f"callvault: error: {exc.format_message()} (see `{command} --help`)", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        print(f"callvault: error: {exc.format_message()}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except click.Abort:  # Ctrl-C where the command does not handle it itself
        print("callvault: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:
        # A damaged index is found by whatever query reads the damaged page first: one line
        # (what is wrong, how to check, restore a backup) instead of a traceback. Looked up
        # in sys.modules: commands that never open the index must not import it for this.
        index = sys.modules.get("callvault.index")
        if index is None or not isinstance(exc, index.IndexFailure):
            raise
        print(f"callvault: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
