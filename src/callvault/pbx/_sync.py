"""A blocking facade over `PbxClient` for scripts: the same methods, without ``await``.

It owns one event loop (an ``asyncio.Runner``) for its whole life, so the session, its gate
and the connections of the async client stay on one loop. Not for use inside a running loop.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from callvault.pbx._client import PbxClient, ProgressCallback
from callvault.pbx._types import CallDetail, DownloadResult


class SyncPbxClient:
    """`PbxClient` for synchronous code; takes the same arguments. Use as a context manager."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = PbxClient(*args, **kwargs)
        self._closed = False

    def __repr__(self) -> str:
        return f"Sync{self._client!r}"

    @property
    def client(self) -> PbxClient:
        """The async client underneath."""
        return self._client

    @property
    def last_success_at(self) -> float | None:
        return self._client.last_success_at

    @property
    def logged_in(self) -> bool:
        return self._client.logged_in

    def __enter__(self) -> SyncPbxClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Log out (errors ignored), close the connections and the event loop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self._client.aclose())
        finally:
            self._runner.close()

    def login(self) -> None:
        self._runner.run(self._client.login())

    def heartbeat(self) -> None:
        self._runner.run(self._client.heartbeat())

    def logout(self) -> None:
        self._runner.run(self._client.logout())

    def download_recording(
        self,
        name: str,
        dest_dir: Path,
        *,
        filename: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> DownloadResult:
        return self._runner.run(
            self._client.download_recording(name, dest_dir, filename=filename, progress=progress)
        )

    def export_cdr(
        self, start: datetime, end: datetime, *, extensions: str = "all"
    ) -> list[CallDetail]:
        return self._runner.run(self._client.export_cdr(start, end, extensions=extensions))

    def run_keepalive(self, interval: float = 600.0) -> None:
        """Heartbeat every `interval` seconds until interrupted (blocks)."""
        self._runner.run(self._client.run_keepalive(interval))
