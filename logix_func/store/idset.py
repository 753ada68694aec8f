"""Sets of data ids as sorted numpy columns: 8 bytes per int id (``id_bytes`` per string id)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Set
from typing import Any

import numpy as np


def lookup(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(index, found)`` of each query id in a sorted id column."""
    if len(sorted_ids) == 0:
        return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
    at = np.searchsorted(sorted_ids, query).clip(max=len(sorted_ids) - 1)
    return at, sorted_ids[at] == query


class IdSet(Set):
    """A read-only set of data ids over a sorted, repeat-free id column.

    Behaves as a ``set`` of python ids (``in``, ``len``, iteration in sorted order, ``==``,
    ``-``, ``&``, ``|``); :meth:`contains` tests a whole array at once.
    """

    def __init__(self, column: np.ndarray, strings: bool):
        self.column, self.strings = column, strings

    def _key(self, data_id: Any) -> Any:
        if self.strings:
            return data_id.encode() if isinstance(data_id, str) else None
        if isinstance(data_id, bool) or not isinstance(data_id, (int, np.integer)):
            return int(data_id) if getattr(data_id, "ndim", None) == 0 else None
        return data_id

    def __contains__(self, data_id: Any) -> bool:
        key = self._key(data_id)
        if key is None or (self.strings and (len(key) > self.column.itemsize or b"\0" in key)):
            return False
        if not self.strings and not -(2**63) <= key < 2**63:
            return False
        return bool(lookup(self.column, np.asarray([key], self.column.dtype))[1][0])

    def contains(self, column: np.ndarray) -> np.ndarray:
        """``[n]`` bool: which ids of an id column (int64, or ``S<id_bytes>``) are in the set."""
        return lookup(self.column, column)[1]

    def __len__(self) -> int:
        return len(self.column)

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self.column), 1 << 16):  # python objects for a block at a time
            block = self.column[start : start + (1 << 16)].tolist()
            yield from (b.decode() for b in block) if self.strings else block

    @classmethod
    def _from_iterable(cls, items: Iterable) -> set:
        return set(items)

    def __repr__(self) -> str:
        return f"IdSet({len(self)} ids)"


class KnownIds:
    """Ids a writer must not store again, as sorted numpy columns.

    Parts of decreasing size, merged like a binary counter: at most log2(n) parts to search.
    """

    def __init__(self, sorted_ids: np.ndarray):
        self.parts = [sorted_ids]

    def contains(self, column: np.ndarray) -> np.ndarray:
        return np.logical_or.reduce([lookup(part, column)[1] for part in self.parts])

    def add(self, column: np.ndarray) -> None:
        part = np.sort(column)
        while self.parts and len(self.parts[-1]) <= len(part):
            part = np.sort(np.concatenate([self.parts.pop(), part]))
        self.parts.append(part)
