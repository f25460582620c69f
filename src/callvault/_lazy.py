"""Names a package exports but imports only when first used (PEP 562).

A package lists where each such name lives; its module `__getattr__` comes from here. This
keeps commands cheap to start: `callvault list` never loads the PBX client or the
operations it does not run. Each package also imports the names under TYPE_CHECKING, so
type checkers and readers see them as plain imports.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports each name of `homes` from its
    module (``package.<home>``) on first use and keeps it in the package."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
