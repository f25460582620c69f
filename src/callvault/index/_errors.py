"""The index's exceptions: what a caller catches, and what each one means."""

from __future__ import annotations


class IndexFailure(Exception):
    """The index cannot do what was asked, for a reason a person must act on; the message
    is one line saying what is wrong and what to do. The base of the index's errors."""


class IndexOpenError(IndexFailure):
    """The index database cannot be opened: bad URL, missing file, unreadable, or too new."""


class IndexMissingError(IndexOpenError):
    """The SQLite file of the index does not exist (and was not asked to be created)."""


class IndexCorruptError(IndexFailure):
    """The index database is damaged ("file is not a database", "database disk image is
    malformed"): raised by `open_index` and by any later query. `reason` is the driver's
    own words; the message says how to check the database and to restore a backup."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidCallDetail(ValueError):
    """A call detail record the index cannot store (see `call_detail_problem`): no callid,
    a callid or recording name longer than its column (they identify the call and the file,
    so they are never shortened; every other over-long field is truncated instead, the full
    text stays in `raw`), or times no call can have (a start in year 1 or 9999, a duration
    of centuries). A receiver answers it with 400: sending the same record again cannot
    help."""
