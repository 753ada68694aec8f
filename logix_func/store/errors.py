"""Errors raised by the store; all derive from :class:`StoreError`."""

from __future__ import annotations

from .. import _ids as ids


class StoreError(Exception):
    """Base class of the store's errors."""


class SchemaError(StoreError, ValueError):
    """Rows, ids or a schema do not match the store's schema."""


class DuplicateIdError(StoreError, ids.DuplicateIdError):
    """A data id would be stored twice; ``.ids`` lists them (a ``logix_func.DuplicateIdError``)."""


class NotAStoreError(StoreError, FileNotFoundError):
    """The URL holds no store."""


class WriterConflictError(StoreError):
    """Another process holds (or took over) the same writer id."""


class StoreIOError(StoreError, OSError):
    """Reading or writing the underlying storage failed (permissions, full disk, network)."""


class CorruptStoreError(StoreIOError):
    """A stored file is damaged: a checksum mismatch, a truncated marker, crafted metadata."""


def listed(items: list, limit: int = 10) -> str:
    """The first ``limit`` items, repr'd, and how many more there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(map(repr, items[:limit])) + more
