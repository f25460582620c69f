"""A P-Series PBX's tokens, kept in its registry entry (`pbxs.tokens_sealed`).

A P-Series API application may hold eight live access tokens; each lives 30 minutes
(some firmware ends the older ones at every new login instead). A `serve` that restarts,
or the node that takes a PBX over from another, must therefore reuse the token set the
last one had rather than ask for a new one: the client (`callvault.pbx.PSeriesClient`)
reads and writes its token set through a `TokenStore`, and this one keeps it in the index,
sealed with the master key and bound to the PBX's name.

A set that does not open (the master key was rotated away, the row was altered) or does
not parse counts as none: the client then asks the PBX for a new one.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from callvault.index import Index
from callvault.index.pbxs import tokens_context
from callvault.keys import Keyring, MasterKeyError
from callvault.pbx import TokenSet

log = logging.getLogger("callvault.archive")


class IndexTokenStore:
    """The token set of registered PBX `name` (id `pbx_id`), sealed in its entry."""

    def __init__(self, index: Index, pbx_id: int, name: str, keyring: Keyring) -> None:
        self._index = index
        self._pbx_id = pbx_id
        self._name = name
        self._keyring = keyring

    def __repr__(self) -> str:
        return f"IndexTokenStore(pbx={self._name!r})"

    def load(self) -> TokenSet | None:
        sealed = self._index.pbxs.load_tokens(self._pbx_id)
        if sealed is None:
            return None
        try:
            fields = json.loads(self._keyring.open(sealed, tokens_context(self._name)))
            return TokenSet(**fields)
        except (MasterKeyError, ValueError, TypeError) as exc:
            # Never the value itself: it holds the tokens.
            log.warning(
                "PBX %s: the tokens kept in the index cannot be used (%s); asking for new ones",
                self._name,
                type(exc).__name__,
            )
            return None

    def save(self, tokens: TokenSet | None) -> None:
        sealed = None
        if tokens is not None:
            plain = json.dumps(dataclasses.asdict(tokens), separators=(",", ":")).encode()
            sealed = self._keyring.seal(plain, tokens_context(self._name))
        self._index.pbxs.save_tokens(self._pbx_id, sealed)
