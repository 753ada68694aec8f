"""Opening what a store holds: its root, its ``logix_func`` attributes and its schema.

Shared by `LogStore` and the readers (`LogDataset`), so that neither imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CorruptStoreError, NotAStoreError, SchemaError
from .layout import ATTRS_NAME, GROUP_KEY, Root
from .schema import StoreSchema


def stored_attrs(group: Any, url: str) -> dict:
    """The ``logix_func`` attributes of a zarr group's metadata; `NotAStoreError` if none."""
    attrs = group.get("attributes", {}) if isinstance(group, dict) else {}
    if ATTRS_NAME not in attrs:
        kind = group.get("node_type", "file") if isinstance(group, dict) else "file"
        raise NotAStoreError(f"{url} holds a zarr {kind}, not a logix_func store")
    return attrs[ATTRS_NAME]


def stored_schema(attrs: dict, url: str) -> StoreSchema:
    """The schema in a store's attributes; `CorruptStoreError` if it is not a valid one."""
    try:
        return StoreSchema.from_json(attrs["schema"])
    except (SchemaError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptStoreError(
            f"{url}/{GROUP_KEY} holds no valid schema ({type(e).__name__}: {e}): "
            "damaged or written by another tool; restore it from a copy"
        ) from None


def open_root(url: str | Mapping[str, Any], durable: bool = True) -> tuple[Root, dict]:
    """The root of the store at ``url`` and its attributes; `NotAStoreError` if none is there."""
    root = Root(url, durable)
    group, _ = root.read_json(GROUP_KEY)
    if group is None:
        raise NotAStoreError(
            f"no logix_func store at {url} (it has no zarr.json); "
            "create one with LogStore.create(url, schema)"
        )
    return root, stored_attrs(group, url)
