"""Storage: recording bytes by key, behind one small interface (`Storage`).

`LocalStorage` keeps them under a directory; keys come from `recording_key`, which turns
the PBX's untrusted names into safe ones. Writes are atomic and durable; nothing is ever
written outside the storage root.
"""

from __future__ import annotations

from callvault.storage._base import (
    ConflictError,
    StagingArea,
    Storage,
    StorageError,
    StorageUsage,
    StoredObject,
    sha256_of,
)
from callvault.storage._local import STAGING_NAME, LocalStagingArea, LocalStorage
from callvault.storage._names import (
    UnsafeNameError,
    check_key,
    is_safe_name,
    recording_key,
    safe_name,
    safe_serial,
)

__all__ = [
    "STAGING_NAME",
    "ConflictError",
    "LocalStagingArea",
    "LocalStorage",
    "StagingArea",
    "Storage",
    "StorageError",
    "StorageUsage",
    "StoredObject",
    "UnsafeNameError",
    "check_key",
    "is_safe_name",
    "recording_key",
    "safe_name",
    "safe_serial",
    "sha256_of",
]
