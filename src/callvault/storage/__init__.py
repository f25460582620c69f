"""Storage: recording bytes by key, behind one small interface (`Storage`).

`LocalStorage` keeps them under a directory, `S3Storage` in an S3-compatible bucket;
`open_storage_url` gives the one a storage URL names (``file:///DIR``, ``s3://BUCKET/P``).
Keys come from `recording_key`, which turns the PBX's untrusted names into safe ones.
Writes are atomic and durable; nothing is ever written outside the storage root.
"""

from __future__ import annotations

from pathlib import Path

from callvault.storage._base import (
    ConflictError,
    ObjectLock,
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
from callvault.storage._s3 import S3Storage, parse_storage_url

__all__ = [
    "STAGING_NAME",
    "ConflictError",
    "LocalStagingArea",
    "LocalStorage",
    "ObjectLock",
    "S3Storage",
    "StagingArea",
    "Storage",
    "StorageError",
    "StorageUsage",
    "StoredObject",
    "UnsafeNameError",
    "check_key",
    "is_safe_name",
    "open_storage_url",
    "parse_storage_url",
    "recording_key",
    "safe_name",
    "safe_serial",
    "sha256_of",
]


def open_storage_url(url: str | None, work_dir: Path) -> Storage:
    """The storage `url` names (None: the directory `work_dir` itself); downloads in
    progress are staged in `work_dir` whatever the storage. ValueError for a URL that is
    not one (one line); OSError when a directory cannot be made or used."""
    if url is None or not url.strip():
        return LocalStorage(work_dir)
    scheme, location, prefix = parse_storage_url(url)
    if scheme == "file":
        return LocalStorage(Path(location))
    return S3Storage(location, prefix, work_dir=work_dir)
