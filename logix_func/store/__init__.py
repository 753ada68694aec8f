"""Logs on tensorstore (zarr v3): crash-safe, resumable, concurrent writers; see docs/store.md."""

from .errors import (
    CorruptStoreError,
    DuplicateIdError,
    NotAStoreError,
    SchemaError,
    StoreError,
    StoreIOError,
    WriterConflictError,
)
from .logstore import LogStore
from .reader import LogDataset
from .schema import StoreSchema, model_fingerprint

__all__ = [
    "CorruptStoreError",
    "DuplicateIdError",
    "LogDataset",
    "LogStore",
    "NotAStoreError",
    "SchemaError",
    "StoreError",
    "StoreIOError",
    "StoreSchema",
    "WriterConflictError",
    "model_fingerprint",
]
