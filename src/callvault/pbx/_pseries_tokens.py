"""The P-Series token budget: one token set per (PBX base URL, API client ID).

A P-Series API app may hold at most 8 live access tokens (errcode 60002 when full, for up
to 30 minutes, across restarts), and some firmware instead invalidates every older token on
each ``get_token``. So tokens are cached and shared, never fetched per request: a
`PSeriesClient` reads its `TokenStore` before asking the PBX, and writes every token set it
gets there. The archiver passes a store that persists (sealed in its index) so that a
restart or another node reuses the same token; by default each (base URL, client ID) has
one in-memory store per process (`shared_memory_store`).

Kept free of the HTTP stack. Tokens never appear in a repr.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TokenSet:
    """An access token and its refresh token, with the instants (Unix epoch seconds, the
    PBX's clock as the client reads it) at which each stops working."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_expires_at: float
    refresh_expires_at: float

    def __post_init__(self) -> None:
        # A set read back from storage is checked here, so that a damaged one fails at once
        # (TypeError/ValueError) instead of in the middle of a request.
        if not isinstance(self.access_token, str) or not self.access_token:
            raise TypeError("a token set needs an access token (text)")
        if not isinstance(self.refresh_token, str):
            raise TypeError("a token set's refresh token must be text")
        for name in ("access_expires_at", "refresh_expires_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"a token set's {name} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"a token set's {name} must be finite")
            object.__setattr__(self, name, float(value))

    def access_left(self, now: float) -> float:
        """Seconds the access token still lives at `now` (negative once expired)."""
        return self.access_expires_at - now

    def refresh_left(self, now: float) -> float:
        """Seconds the refresh token still lives at `now` (negative once expired)."""
        return self.refresh_expires_at - now


class TokenStore(Protocol):
    """Where a client keeps its token set between calls, restarts and nodes.

    `load` returns the last token set saved (None: none, or forgotten); `save` replaces it
    (None: forget it). Both are called on the event loop and must be quick. A store that
    fails may raise: the client logs it and goes on as if it held nothing.
    """

    def load(self) -> TokenSet | None: ...

    def save(self, tokens: TokenSet | None) -> None: ...


class MemoryTokenStore:
    """A token set in memory (thread-safe)."""

    def __init__(self, tokens: TokenSet | None = None) -> None:
        self._tokens = tokens
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryTokenStore(holds_token={self._tokens is not None})"

    def load(self) -> TokenSet | None:
        with self._lock:
            return self._tokens

    def save(self, tokens: TokenSet | None) -> None:
        with self._lock:
            self._tokens = tokens


_SHARED: dict[tuple[str, str], MemoryTokenStore] = {}
_SHARED_LOCK = threading.Lock()


def shared_memory_store(base_url: str, client_id: str) -> MemoryTokenStore:
    """The process's one in-memory store for (base URL, client ID): every client of the
    same API app on the same PBX shares its tokens, unless given a store of its own."""
    key = (base_url.rstrip("/").lower(), client_id)
    with _SHARED_LOCK:
        store = _SHARED.get(key)
        if store is None:
            store = _SHARED[key] = MemoryTokenStore()
        return store
