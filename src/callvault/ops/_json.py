"""One JSON form for the results of callvault.ops, for `--json` and the web API alike."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any


def json_ready(value: Any) -> Any:
    """`value` with dataclasses as objects, datetimes as ISO 8601 in UTC, paths as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_ready(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


class JsonResult:
    """Mixed into result dataclasses: `to_json()` gives the shape both interfaces print."""

    def to_json(self) -> dict[str, Any]:
        ready = json_ready(self)
        assert isinstance(ready, dict)
        return ready
