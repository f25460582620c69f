"""The documentation in docs/ says what the code does: it cannot drift unnoticed.

- docs/cli.md is exactly what scripts/gen_cli_reference.py makes from the commands now;
- every link between pages (and to a heading) resolves;
- every `callvault ...` command shown in the docs exists, with the options shown;
- the quick start's commands parse as printed, and put `callvault` on the PATH first;
- every JSON API endpoint, simulator fault and index table and column is documented, and
  nothing documented is gone.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import shlex
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GENERATOR = ROOT / "scripts" / "gen_cli_reference.py"
README = ROOT / "README.md"  # its links go from the repository's root
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}

# -- reading the Markdown ------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, first line number and text."""

    language: str
    line: int
    text: str


@dataclass(frozen=True)
class Page:
    path: Path
    text: str

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def blocks(self) -> list[Block]:
        found: list[Block] = []
        language: str | None = None
        start = 0
        body: list[str] = []
        for number, line in enumerate(self.text.splitlines(), start=1):
            fence = re.match(r"^\s*```(\S*)", line)
            if fence and language is None:
                language, start, body = fence.group(1).lower(), number, []
            elif fence:
                found.append(Block(language or "", start, "\n".join(body)))
                language = None
            elif language is not None:
                body.append(line)
        return found

    def prose(self) -> str:
        """The text outside fenced code blocks."""
        return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", self.text, flags=re.S | re.M)

    def inline_code(self) -> list[str]:
        return re.findall(r"`([^`\n]+)`", self.prose())

    def headings(self) -> list[tuple[int, str]]:
        return [
            (len(match.group(1)), match.group(2).strip())
            for match in re.finditer(r"^(#{1,6})\s+(.+?)\s*#*\s*$", self.prose(), flags=re.M)
        ]


def pages() -> list[Page]:
    """Every page of docs/, and the README."""
    paths = [*sorted(DOCS.rglob("*.md")), README]
    return [Page(p, p.read_text(encoding="utf-8")) for p in paths]


def page(name: str) -> Page:
    path = DOCS / name
    return Page(path, path.read_text(encoding="utf-8"))


def slugify(heading: str) -> str:
    """The id mkdocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"`|\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


# -- the command tree ----------------------------------------------------------------------


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_reference", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


@pytest.fixture(scope="module")
def root(generator: ModuleType) -> Any:
    return generator.root_command()


def option_names(command: Any) -> set[str]:
    names = {"--help"}
    for param in getattr(command, "params", []):
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


_SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1"}


def callvault_invocations(text: str) -> Iterator[list[str]]:
    """The arguments of every `callvault` run in a line of shell (or a code span): where a
    command starts (the line's start, after an operator or after VAR=value settings)."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: not a command line
        return
    at_start = True
    for i, token in enumerate(tokens):
        if token in _SHELL_OPERATORS:
            at_start = True
            continue
        if at_start and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):
            continue
        if at_start and (token == "callvault" or token.endswith("bin/callvault")):
            args: list[str] = []
            for arg in tokens[i + 1 :]:
                if arg in _SHELL_OPERATORS:
                    break
                args.append(arg)
            yield args
        at_start = False


def shell_lines(block: Block) -> Iterator[str]:
    """Logical lines of a shell block (continuations joined)."""
    yield from re.sub(r"\\\n\s*", " ", block.text).splitlines()


def resolve(root: Any, args: list[str]) -> tuple[Any, list[str], list[str]]:
    """(command, its arguments, the command path) for `callvault ARGS`; AssertionError if a
    command named in ARGS does not exist."""
    command, path = root, ["callvault"]
    rest = list(args)
    while rest and getattr(command, "commands", None):
        word = rest[0]
        if not re.fullmatch(r"[a-z][a-z0-9-]*", word):  # an option, or COMMAND, ...
            break
        if word not in command.commands:
            raise AssertionError(f"`{' '.join(path)} {word}`: no such command")
        command, path = command.commands[word], [*path, word]
        rest = rest[1:]
    return command, rest, path


def check_options(command: Any, args: list[str], path: list[str]) -> None:
    known = option_names(command)
    for arg in args:
        name = arg.strip("[]").split("=", 1)[0]
        if name.startswith("-") and name not in ("-", "--") and not name.startswith("---"):
            assert name in known, f"`{' '.join(path)}` has no option {name}"


def commands_shown(page_: Page) -> Iterator[tuple[str, list[str]]]:
    """(where, args) of every callvault command in shell blocks and code spans."""
    for block in page_.blocks():
        if block.language in SHELL_LANGUAGES:
            for line in shell_lines(block):
                for args in callvault_invocations(line):
                    yield f"{page_.name}:{block.line}", args
    for span in page_.inline_code():
        if re.match(r"^(?:\S*bin/)?callvault(?:\s|$)", span):
            for args in callvault_invocations(span):
                yield f"{page_.name}: `{span}`", args


# -- the tests -----------------------------------------------------------------------------


def test_cli_reference_is_current(generator: ModuleType) -> None:
    fresh = generator.render()
    committed = (DOCS / "cli.md").read_text(encoding="utf-8")
    if committed != fresh:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    "docs/cli.md (committed)",
                    "docs/cli.md (from the commands now)",
                )
            )[:60]
        )
        pytest.fail(
            f"docs/cli.md is stale: regenerate it with `{generator.REGENERATE}` and commit "
            f"it.\n{diff}"
        )


def test_cli_reference_is_deterministic(generator: ModuleType) -> None:
    assert generator.render() == generator.render()


def test_cli_reference_names_every_command(generator: ModuleType, root: Any) -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for path, command in generator.walk(root):
        heading = " ".join(path)
        assert re.search(rf"^#+ {re.escape(heading)}$", text, flags=re.M), heading
        for param in getattr(command, "params", []):
            for name in getattr(param, "opts", []):
                if name.startswith("-"):
                    assert f"`{name}" in text, f"{heading} {name}"


def test_every_link_between_pages_resolves() -> None:
    anchors = {p.path: {slugify(h) for _level, h in p.headings()} for p in pages()}
    problems: list[str] = []
    for p in pages():
        base = ROOT if p.path == README else p.path.parent
        for target in re.findall(r"\]\(([^)\s]+)\)", p.prose()):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            path = (base / file_part).resolve() if file_part else p.path
            if not path.is_file():
                problems.append(f"{p.name}: link to {target}: no such file")
            elif anchor and anchor not in anchors.get(path, set()):
                problems.append(f"{p.name}: link to {target}: no such heading")
    assert problems == []


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", nav, flags=re.M))
    on_disk = {p.path.name for p in pages() if p.path != README}
    assert on_disk == listed


def test_every_callvault_command_in_the_docs_exists(root: Any) -> None:
    seen = 0
    problems: list[str] = []
    for p in pages():
        for where, args in commands_shown(p):
            seen += 1
            try:
                command, rest, path = resolve(root, args)
                check_options(command, rest, path)
            except AssertionError as exc:
                problems.append(f"{where}: {exc}")
    assert problems == []
    assert seen > 50  # the scan found the commands (a broken scan would pass vacuously)


def test_the_checks_catch_a_wrong_command_and_a_wrong_option(root: Any) -> None:
    with pytest.raises(AssertionError, match="no such command"):
        resolve(root, ["archive", "--archive", "x"])
    with pytest.raises(AssertionError, match="no such command"):
        resolve(root, ["user", "delete", "bob"])
    command, rest, path = resolve(root, ["list", "--archieve", "x"])
    with pytest.raises(AssertionError, match="no option --archieve"):
        check_options(command, rest, path)


def quick_start_sections() -> Iterator[tuple[str, list[Block]]]:
    """(title, shell blocks) of each part of the quick start (getting-started.md's
    "Quick start" section and its subsections) and of the README's "Try it"."""
    draft = Page(README, README.read_text(encoding="utf-8"))
    for p, first in ((page("getting-started.md"), "Quick start"), (draft, "Try it")):
        lines = p.text.splitlines(keepends=True)
        inside = False
        title = ""
        chunk: list[str] = []
        parts: list[tuple[str, str]] = []
        for line in lines:
            heading = re.match(r"^(#{2,3})\s+(.*)$", line)
            if heading:
                if inside and chunk:
                    parts.append((title, "".join(chunk)))
                if len(heading.group(1)) == 2:
                    inside = heading.group(2).strip() == first
                title, chunk = heading.group(2).strip(), []
                continue
            if inside:
                chunk.append(line)
        if inside and chunk:
            parts.append((title, "".join(chunk)))
        for title, text in parts:
            part = Page(p.path, text)
            yield f"{p.name} / {title}", [b for b in part.blocks() if b.language in SHELL_LANGUAGES]


def test_quick_start_commands_parse_as_printed(root: Any) -> None:
    parsed = 0
    for where, blocks in quick_start_sections():
        for block in blocks:
            for line in shell_lines(block):
                for args in callvault_invocations(line):
                    command, rest, path = resolve(root, args)
                    parent = root.context_class(root, info_name="callvault")
                    try:
                        command.make_context(path[-1], rest, parent=parent)
                    except Exception as exc:
                        pytest.fail(f"{where}: `{line.strip()}` does not parse: {exc}")
                    parsed += 1
    assert parsed >= 5


def test_quick_start_puts_callvault_on_the_path_before_using_it() -> None:
    """In a fresh shell `callvault` is not found: each part of the quick start activates
    the virtual environment before a bare `callvault`, or writes .venv/bin/callvault."""
    for where, blocks in quick_start_sections():
        activated = False
        for block in blocks:
            for line in shell_lines(block):
                tokens = shlex.split(line, comments=True)
                if tokens[:2] in ([".", ".venv/bin/activate"], ["source", ".venv/bin/activate"]):
                    activated = True
                if "callvault" in tokens and not activated:
                    pytest.fail(f"{where}: `{line.strip()}` runs callvault before activating")


def test_every_api_endpoint_is_documented(tmp_path: Path) -> None:
    from callvault.index import open_index
    from callvault.storage import LocalStorage
    from callvault.web import create_app

    def shape(method: str, path: str) -> str:
        return f"{method} {re.sub(r'{[^}]*}', '{}', path)}"

    index = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    try:
        app = create_app(index, LocalStorage(tmp_path))
        # The OpenAPI document lists every API route (the pages are left out of it).
        served = {
            shape(method.upper(), path)
            for path, operations in app.openapi()["paths"].items()
            for method in operations
            if method.upper() in {"GET", "POST", "PUT", "PATCH", "DELETE"}
        }
        served.add(shape("GET", app.openapi_url or ""))
    finally:
        index.close()
    text = page("web.md").text
    documented = {
        shape(m.group(1), m.group(2))
        for m in re.finditer(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s?]*)", text)
    }
    assert "GET /api/openapi.json" in served
    assert sorted(served - documented) == [], "endpoints missing from docs/web.md"
    assert sorted(documented - served) == [], "docs/web.md names endpoints that do not exist"


def test_every_simulator_fault_is_documented() -> None:
    from callvault.simulator import fault_names

    text = page("simulator.md").text
    table = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {
        name.split("=", 1)[0]
        for line in table
        for name in re.findall(r"`([a-z0-9_]+(?:=[A-Z]+)?)`", line.split("|")[1])
    }
    assert sorted(set(fault_names()) - documented) == [], "faults missing from simulator.md"
    assert sorted(documented - set(fault_names())) == [], "simulator.md names unknown faults"


def schema_sections() -> dict[str, set[str]]:
    """table -> the columns named in the first column of its section's table."""
    sections: dict[str, set[str]] = {}
    current: str | None = None
    for line in page("index-schema.md").text.splitlines():
        heading = re.match(r"^## `(\w+)`\s*$", line)
        if heading:
            current = heading.group(1)
            sections[current] = set()
        elif line.startswith("#"):  # any other heading ends the table's columns
            current = None
        elif current and line.startswith("| `"):
            sections[current].update(re.findall(r"`(\w+)`", line.split("|")[1]))
    return sections


def test_the_index_schema_page_matches_the_schema() -> None:
    from callvault.index.schema import metadata

    sections = schema_sections()
    problems: list[str] = []
    for name, table in metadata.tables.items():
        if name not in sections:
            problems.append(f"table {name} is not on docs/index-schema.md")
            continue
        for column in table.columns:
            if column.name not in sections[name]:
                problems.append(f"column {name}.{column.name} is not on docs/index-schema.md")
    for name, columns in sections.items():
        if name not in metadata.tables:
            problems.append(f"docs/index-schema.md describes a table {name} that is gone")
            continue
        for column in columns - {c.name for c in metadata.tables[name].columns}:
            problems.append(f"docs/index-schema.md describes a column {name}.{column}")
    assert problems == []
