"""The simulator's clock: real time plus an offset that tests can move forward at once."""

from __future__ import annotations

import threading
import time


class Clock:
    """Epoch seconds as the PBX sees them.

    The clock follows real time, shifted by an offset; :meth:`advance` adds to the offset so a
    test can make thirty seconds (or ten minutes) pass without sleeping. Thread-safe.
    """

    def __init__(self, offset: float = 0.0) -> None:
        self._offset = offset
        self._lock = threading.Lock()

    def now(self) -> float:
        """Current PBX time, in seconds since the epoch."""
        with self._lock:
            offset = self._offset
        return time.time() + offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds` (negative values move it back)."""
        with self._lock:
            self._offset += seconds

    @property
    def offset(self) -> float:
        """How far this clock is ahead of real time, in seconds."""
        with self._lock:
            return self._offset

    def __repr__(self) -> str:
        return f"Clock(offset={self.offset:.3f})"
