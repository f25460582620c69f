"""Which module registers which command.

`callvault fetch` should not pay for importing the web app, the database layer and the
simulator: `main()` imports only the module of the command being run (all of them for
`--help` or an unknown command). Add a command here when you add one to a module.
"""

from __future__ import annotations

import importlib

COMMAND_MODULES: dict[str, str] = {
    "audit": "_compliance",
    "backfill": "_serve",
    "cdr": "_fetch",
    "demo": "_demo",
    "delete": "_retention",
    "fetch": "_fetch",
    "hold": "_retention",
    "index": "_archive_cmds",
    "keys": "_pbx",
    "list": "_archive_cmds",
    "pbx": "_pbx",
    "requeue": "_archive_cmds",
    "retention": "_retention",
    "serve": "_serve",
    "simulate": "_simulate",
    "status": "_archive_cmds",
    "storage": "_archive_cmds",
    "subject": "_retention",
    "token": "_web",
    "user": "_web",
    "verify": "_archive_cmds",
    "verify-export": "_compliance",
    "web": "_web",
}


def register(command: str | None) -> None:
    """Import the module(s) that add `command` to the app (every module if unknown)."""
    module = COMMAND_MODULES.get(command or "")
    names = [module] if module else sorted(set(COMMAND_MODULES.values()))
    for name in names:
        importlib.import_module(f"callvault.cli.{name}")
