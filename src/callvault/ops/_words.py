"""Quantities in words for people, the same on the command line and the pages."""

from __future__ import annotations


def human_size(value: int | None) -> str:
    """A byte count as people read it: "512 B", "3.4 MiB", "1.2 TiB" (powers of 1,024)."""
    if value is None:
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"  # pragma: no cover - the loop always returns
