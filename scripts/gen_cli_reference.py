"""Write docs/cli.md, the CLI reference, from the commands themselves.

    .venv/bin/python scripts/gen_cli_reference.py           # rewrite docs/cli.md
    .venv/bin/python scripts/gen_cli_reference.py --check   # exit 1 if docs/cli.md is stale

It registers every command of `callvault.cli` (as `callvault --help` does), walks the
click command tree, and writes the Markdown from each command's and parameter's own
attributes: names, value type, default, environment variable, help text. Nothing goes
through a terminal formatter, so the page does not depend on the width of anyone's
terminal or on how a click version decorates its help screens; the same code
always gives the same page. tests/test_docs.py fails when the committed page differs from
a fresh one.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "cli.md"
PROGRAM = "callvault"
REGENERATE = ".venv/bin/python scripts/gen_cli_reference.py"

# Python types of option values, as the help names them.
_TYPE_NAMES: dict[type, str] = {
    str: "TEXT",
    int: "INTEGER",
    float: "NUMBER",
    Path: "PATH",
}
_CODE_SPAN = re.compile(r"(`[^`]*`)")


def root_command() -> Any:
    """The `callvault` command group with every command registered."""
    import callvault.cli as cli

    cli._register()
    return cli.app


def _subcommands(group: Any) -> list[tuple[str, Any]]:
    commands: dict[str, Any] = getattr(group, "commands", {}) or {}
    return sorted(
        (name, command)
        for name, command in commands.items()
        if not getattr(command, "hidden", False)
    )


def walk(command: Any, path: tuple[str, ...] = (PROGRAM,)) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command under `command` (itself first), depth first, subcommands by name."""
    yield path, command
    for name, sub in _subcommands(command):
        yield from walk(sub, (*path, name))


def _paragraphs(text: str) -> list[str]:
    """Help text as Markdown paragraphs: each source paragraph on one line (however the
    docstring was wrapped), click's ``\\b`` no-rewrap blocks kept as they are."""
    result: list[str] = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text).strip()):
        if not block.strip():
            continue
        if block.lstrip().startswith("\b"):
            lines = block.lstrip()[1:].strip("\n")
            result.append("```text\n" + lines + "\n```")
        else:
            result.append(_escape(" ".join(line.strip() for line in block.splitlines())))
    return result


def _escape(text: str) -> str:
    """Keep help text literal in Markdown outside code spans: no HTML tags, no emphasis.
    (Underscores inside words, as in CALLVAULT_ARCHIVE, are not emphasis in Markdown.)"""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        part = parts[i].replace("<", "&lt;").replace(">", "&gt;")
        parts[i] = part.replace("*", "\\*")
    return "".join(parts)


def _annotation(command: Any, name: str) -> Any:
    """The Python type a command's function declares for parameter `name`, if known."""
    callback = getattr(command, "callback", None)
    if callback is None:
        return None
    try:
        hints = typing.get_type_hints(inspect.unwrap(callback))
    except Exception:  # an unresolvable annotation: fall back to the parameter's own type
        return None
    return hints.get(name)


def _value_type(annotation: Any) -> tuple[str | None, bool]:
    """(placeholder, is_list) of an annotation: `Path | None` -> ("PATH", False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _value_type(args[0]) if len(args) == 1 else (None, False)
    if origin in (list, tuple, set):
        args = typing.get_args(annotation)
        return (_value_type(args[0])[0] if args else None), True
    if isinstance(annotation, type):
        for kind, name in _TYPE_NAMES.items():
            if issubclass(annotation, kind):
                return name, False
    return None, False


def _placeholder(command: Any, param: Any) -> str:
    metavar = getattr(param, "metavar", None)
    if metavar:
        return str(metavar)
    name, _is_list = _value_type(_annotation(command, param.name))
    if name is None:
        click_type = getattr(param, "type", None)  # click's own parameters
        name = str(getattr(click_type, "name", "") or "value").upper()
    return name


def _is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) or bool(getattr(param, "count", False))


def _default_text(param: Any) -> str | None:
    # As click shows them on the help screen: only where the option asks for it.
    if not getattr(param, "show_default", False) or _is_flag(param):
        return None
    default = getattr(param, "default", None)
    if default is None or callable(default) or default in ((), [], ""):
        return None
    if isinstance(default, list | tuple):
        return ", ".join(str(item) for item in default)
    return str(default)


def _envvars(param: Any) -> list[str]:
    envvar = getattr(param, "envvar", None)
    if not envvar:
        return []
    return [envvar] if isinstance(envvar, str) else list(envvar)


def _option_line(command: Any, param: Any) -> str:
    names = [*param.opts, *getattr(param, "secondary_opts", [])]
    names.sort(key=lambda n: (not n.startswith("--"), n))  # --long first, then -s
    if _is_flag(param):
        shown = " / ".join(f"`{n}`" for n in names)
    else:
        value = _placeholder(command, param)
        shown = ", ".join(f"`{n} {value}`" for n in names)
    notes: list[str] = []
    if getattr(param, "required", False):
        notes.append("required")
    if getattr(param, "multiple", False):
        notes.append("repeatable")
    default = _default_text(param)
    if default is not None:
        notes.append(f"default `{default}`")
    notes.extend(f"env `{name}`" for name in _envvars(param))
    help_text = " ".join(_paragraphs(getattr(param, "help", None) or ""))
    line = f"- {shown}"
    if help_text:
        line += f": {help_text}"
    if notes:
        line += f" ({'; '.join(notes)})"
    return line


def _argument_line(param: Any) -> str:
    shown = str(getattr(param, "metavar", None) or param.name.upper())
    notes = [] if getattr(param, "required", False) else ["optional"]
    help_text = " ".join(_paragraphs(getattr(param, "help", None) or ""))
    line = f"- `{shown}`"
    if help_text:
        line += f": {help_text}"
    if notes:
        line += f" ({'; '.join(notes)})"
    return line


def _params(command: Any, kind: str) -> list[Any]:
    return [
        p
        for p in getattr(command, "params", [])
        if getattr(p, "param_type_name", None) == kind and not getattr(p, "hidden", False)
    ]


def usage(path: tuple[str, ...], command: Any) -> str:
    pieces = [" ".join(path)]
    if _params(command, "option"):
        pieces.append("[OPTIONS]")
    for arg in _params(command, "argument"):
        shown = str(getattr(arg, "metavar", None) or arg.name.upper())
        if getattr(arg, "nargs", 1) == -1 and not shown.endswith("..."):
            shown += "..."
        pieces.append(shown if getattr(arg, "required", False) else f"[{shown}]")
    if _subcommands(command):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _summary(command: Any) -> str:
    text = getattr(command, "short_help", None) or getattr(command, "help", None) or ""
    paragraphs = _paragraphs(text)
    if not paragraphs:
        return ""
    first = paragraphs[0]
    end = re.search(r"(?<=[.!?])\s", first)
    return first[: end.start()] if end else first


def _section(path: tuple[str, ...], command: Any) -> list[str]:
    level = "##" if len(path) <= 2 else "###"
    out = [f"{level} {' '.join(path)}", "", "```text", usage(path, command), "```", ""]
    for paragraph in _paragraphs(getattr(command, "help", None) or ""):
        out += [paragraph, ""]
    arguments = _params(command, "argument")
    if arguments:
        out += ["Arguments:", ""]
        out += [_argument_line(p) for p in arguments]
        out.append("")
    options = _params(command, "option")
    if options:
        out += ["Options:", ""]
        out += [_option_line(command, p) for p in options]
        out.append("")
    subcommands = _subcommands(command)
    if subcommands and len(path) > 1:
        out += ["Commands:", ""]
        out += [
            f"- [`{name}`](#{_anchor((*path, name))}): {_summary(sub)}" for name, sub in subcommands
        ]
        out.append("")
    return out


def _anchor(path: tuple[str, ...]) -> str:
    """The id mkdocs gives the heading of `path` (its default slugify)."""
    return "-".join(path).lower()


def render() -> str:
    """The whole page, as Markdown."""
    root = root_command()
    out = [
        "<!-- Generated from the commands by scripts/gen_cli_reference.py: do not edit.",
        f"     Regenerate with: {REGENERATE} -->",
        "",
        "# CLI reference",
        "",
        "Every command and option of `callvault`, generated from the commands themselves "
        "(`callvault COMMAND --help` prints the same). Every command also takes `--help`. "
        "Options can come from flags, from the environment or from a config file: see "
        "[Operating](operating.md#settings-flags-environment-config-file).",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for path, command in walk(root):
        if len(path) == 1:
            continue
        summary = _summary(command).replace("|", "\\|")
        out.append(f"| [`{' '.join(path)}`](#{_anchor(path)}) | {summary} |")
    out.append("")
    for path, command in walk(root):
        out += _section(path, command)
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/cli.md differs from a fresh one"
    )
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
