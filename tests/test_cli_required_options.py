"""Every command's required options: left out, each is one line naming the option (click's
"Missing option"), exit status 2, and nothing done; never a traceback from the command
running with None in its place.

Walks every command of the real `callvault` app in-process, through `cli._app.run` as the
console script runs it, with its required arguments given and its options left out.
"""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest

from callvault.cli._app import app, run
from callvault.cli._commands import register


def _commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _with_required_options() -> list[tuple[tuple[str, ...], click.Command]]:
    register(None)
    return [
        (path, command)
        for path, command in _commands(app)
        if any(isinstance(p, click.Option) and p.required for p in command.params)
    ]


COMMANDS = _with_required_options()


def test_the_walk_finds_the_commands_with_required_options() -> None:
    found = {" ".join(path) for path, _ in COMMANDS}
    assert {"keys create", "cdr", "backfill", "user add", "token create", "index copy"} <= found


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_a_required_option_left_out_is_one_line(
    path: tuple[str, ...], command: click.Command, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["1" for p in command.params if isinstance(p, click.Argument) and p.required]
    with pytest.raises(SystemExit) as ended:
        run([*path, *arguments])
    assert ended.value.code == 2
    out, err = capsys.readouterr()
    required = [p for p in command.params if isinstance(p, click.Option) and p.required]
    assert err.startswith("callvault: error: Missing option"), err
    assert len(err.strip().splitlines()) == 1, err
    assert any(f"'{name}'" in err for option in required for name in option.opts), err
    assert out == ""
