"""Reading committed rows: a snapshot of every writer's commit marker, in writer then row order."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorstore as ts
import torch
from torch import Tensor

from .errors import DuplicateIdError, listed
from .layout import Root, wait
from .schema import StoreSchema, numpy_to_tensor
from .stored import open_root, stored_schema
from .writer import shard_arrays

Ids = Tensor | list[str]


class Snapshot:
    """Committed rows of every writer at one moment; position ``i`` is the ``i``-th row in
    writer-id order, then append order."""

    def __init__(self, root: Root, schema: StoreSchema, counts: Sequence[tuple[int, int]]):
        self.root, self.schema = root, schema
        self.counts = [(w, n) for w, n in counts if n > 0]
        self.offsets = np.cumsum([0] + [n for _, n in self.counts])
        self._arrays: dict[int, dict] = {}
        self._index: tuple[np.ndarray, np.ndarray] | None = None
        self._repeated: np.ndarray | None = None

    @classmethod
    def take(cls, root: Root, schema: StoreSchema) -> Snapshot:
        writers = root.writers()
        markers = root.read_markers(writers)
        counts = [(w, m["rows"]) for w, (m, _) in zip(writers, markers, strict=True) if m]
        return cls(root, schema, counts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def arrays(self, writer: int) -> dict:
        if writer not in self._arrays:
            self._arrays[writer] = shard_arrays(self.root, self.schema, writer, create=False)
        return self._arrays[writer]

    def _keys(self, layers: Sequence[str] | None) -> list[str]:
        names = list(self.schema.layers) if layers is None else list(layers)
        unknown = [n for n in names if n not in self.schema.layers]
        if unknown:
            raise KeyError(f"layers {unknown} not in the store (it has {list(self.schema.layers)})")
        return ["ids"] + [f"layers/{n}" for n in names]

    def _start_read(self, writer: int, index: Any, keys: list[str]) -> dict:
        """Start copying ``array[index]`` of each key into a new numpy array.

        The arrays are allocated here, not by tensorstore's ``read()`` on its own threads:
        malloc then reuses the pages freed by earlier chunks instead of faulting in fresh ones,
        which halves the cost of a read.
        """
        started = {}
        for key in keys:
            source = self.arrays(writer)[key][index]
            target = np.empty(source.shape, source.dtype.numpy_dtype)
            started[key] = (target, ts.array(target).write(source))
        return started

    def _wait(self, started: dict) -> dict[str, np.ndarray]:
        """The arrays of :meth:`_start_read`, once filled."""
        for key, (_, future) in started.items():
            wait(future, f"reading {key} of {self.root.url}")
        return {key: target for key, (target, _) in started.items()}

    def _finish(self, arrays: dict[str, np.ndarray]) -> tuple[Ids, dict[str, Tensor]]:
        ids = self.decode(self.schema.id_column(arrays.pop("ids")))
        rows = {}
        for key, data in arrays.items():
            name = key[len("layers/") :]
            rows[name] = numpy_to_tensor(data).view(len(data), *self.schema.layers[name])
        return ids, rows

    def decode(self, column: np.ndarray) -> Ids:
        """Ids as users see them: an int64 tensor, or a list of strings."""
        return torch.from_numpy(column) if self.schema.ids == "int" else self.schema.id_keys(column)

    def all_ids(self) -> np.ndarray:
        """Every committed id in position order, as an id column (see ``StoreSchema.id_column``)."""
        started = [self._start_read(w, slice(0, n), ["ids"]) for w, n in self.counts]
        parts = [self.schema.id_column(self._wait(s)["ids"]) for s in started]
        return np.concatenate(parts) if parts else self.schema.id_column(np.zeros((0, 1), np.int64))

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted ids, their positions)``; ids stored twice appear twice (:meth:`repeated`)."""
        if self._index is None:
            ids = self.all_ids()
            order = np.argsort(ids, kind="stable")
            ordered = ids[order]
            del ids
            repeated = ordered[1:][ordered[1:] == ordered[:-1]]
            if len(repeated):  # np.unique only then: its first call imports numpy.ma (≈0.1 s)
                repeated = np.unique(repeated)
            self._index, self._repeated = (ordered, order), repeated
        return self._index

    def repeated(self) -> np.ndarray:
        """Ids stored more than once (by two writers), as a sorted id column."""
        self.index()
        return self._repeated

    def unique_ids(self) -> np.ndarray:
        """Sorted id column of the committed ids, each once."""
        ordered = self.index()[0]
        if len(self._repeated) == 0:
            return ordered
        return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])]

    def duplicate_error(self, repeated: np.ndarray, what: str) -> DuplicateIdError:
        """A :class:`DuplicateIdError` naming ``repeated`` ids, their writers and the repair."""
        ordered, order = self.index()
        begin = ordered.searchsorted(repeated[:10])
        end = ordered.searchsorted(repeated[:10], side="right")
        writers = sorted(  # the writers whose shards hold the first ten repeated ids
            {
                self.counts[s][0]
                for a, b in zip(begin, end, strict=True)
                for s in np.searchsorted(self.offsets, order[a:b], side="right") - 1
            }
        )
        keys = self.schema.id_keys(repeated)
        return DuplicateIdError(
            f"{what}: data ids stored more than once in {self.root.url}, by writers {writers}: "
            f"{listed(keys)}. Scoring would count them twice. Repair: copy the store keeping "
            "one row per id (LogStore.create(new_url, store.schema, on_duplicate='skip') and "
            "append every (ids, rows) of store.iter_chunks()), then use the copy",
            keys,
        )

    def chunks(
        self,
        layers: Sequence[str] | None,
        chunk_rows: int,
        prefetch: int,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[tuple[Ids, dict[str, Tensor]]]:
        """Row ranges of at most ``chunk_rows`` (never across shards) within positions
        ``[start, stop)``, cut from reads of whole stored chunks: each stored chunk is decoded
        once whatever ``chunk_rows`` is. While the caller works on one range, the next
        ``prefetch`` reads are in flight."""
        keys = self._keys(layers)
        stop = len(self) if stop is None else stop
        stored = self.schema.chunk_rows
        span = stored * -(-chunk_rows // stored)  # whole stored chunks, at least chunk_rows
        reads = iter(
            (w, slice(a, min(a - a % stored + span, hi)), hi)
            for (w, n), offset in zip(self.counts, self.offsets, strict=False)
            for lo, hi in [(max(start - int(offset), 0), min(stop - int(offset), n))]
            for a in _read_starts(lo, hi, stored, span)
        )
        pending: deque[tuple[dict, int, int]] = deque()
        held: dict[str, np.ndarray] = {}  # rows read but not yet yielded (less than chunk_rows)
        while True:
            while len(pending) <= prefetch and (read := next(reads, None)) is not None:
                w, rows, hi = read
                pending.append((self._start_read(w, rows, keys), rows.stop, hi))
            if not pending:
                return
            started, end, hi = pending.popleft()
            arrays = self._wait(started)
            if held:
                arrays = {k: np.concatenate([held[k], v]) for k, v in arrays.items()}
            n = len(arrays["ids"])
            cut = n if end == hi else n - n % chunk_rows  # a shard's last rows go out now
            for a in range(0, cut, chunk_rows):
                yield self._finish({k: v[a : min(a + chunk_rows, cut)] for k, v in arrays.items()})
            held = {k: v[cut:] for k, v in arrays.items()} if cut < n else {}

    def read_positions(
        self, positions: np.ndarray, layers: Sequence[str] | None
    ) -> tuple[Ids, dict[str, Tensor]]:
        """Rows at global ``positions`` (any order, repeats allowed), in that order."""
        keys = self._keys(layers)
        if len(positions) == 0:
            ids = torch.zeros(0, dtype=torch.int64) if self.schema.ids == "int" else []
            shapes = {
                k[len("layers/") :]: self.schema.layers[k[len("layers/") :]] for k in keys[1:]
            }
            return ids, {n: torch.zeros(0, *s, dtype=self.schema.dtype) for n, s in shapes.items()}
        if positions.min() < 0 or positions.max() >= len(self):
            raise IndexError(f"positions out of range for a store of {len(self)} rows")
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        parts = []
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            local = positions[where] - self.offsets[s]
            order = np.argsort(local, kind="stable")
            parts.append((where[order], self._start_read(self.counts[s][0], local[order], keys)))
        rows: dict[str, np.ndarray] = {}
        for where, started in parts:
            for key, data in self._wait(started).items():
                if key not in rows:
                    rows[key] = np.empty((len(positions), data.shape[1]), data.dtype)
                rows[key][where] = data
        return self._finish(rows)


def _read_starts(lo: int, hi: int, stored: int, span: int) -> range | list[int]:
    """Starts of the reads of rows ``[lo, hi)``: ``lo``, then every ``span`` rows from the
    stored chunk after it (reads of ``span`` rows aligned to the stored chunks)."""
    if lo >= hi:
        return []
    first = lo - lo % stored + span
    return [lo, *range(first, hi, span)]


class LogDataset(torch.utils.data.Dataset):
    """Rows of a store as a map-style ``Dataset``: item ``i`` is ``(data id, {layer: row})``.

    It holds the URL and a snapshot of row counts, and opens the store lazily in each process.
    tensorstore aborts in a process forked after it was used, so DataLoader workers must be
    started with ``multiprocessing_context="spawn"`` (or ``"forkserver"``); a forked copy raises
    a clear error instead of crashing.
    """

    def __init__(self, url: str, counts: Sequence[tuple[int, int]], layers: Sequence[str] | None):
        self.url, self.counts, self.layers = url, list(counts), layers
        self._snapshot: Snapshot | None = None
        self._pid: int | None = os.getpid()

    def __len__(self) -> int:
        return sum(n for _, n in self.counts)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_snapshot": None, "_pid": None}

    def _open(self) -> Snapshot:
        if self._pid not in (None, os.getpid()):
            raise RuntimeError(
                "LogDataset used in a forked process: tensorstore cannot run after fork(). "
                "Create the DataLoader with multiprocessing_context='spawn' (or 'forkserver')."
            )
        if self._snapshot is None:
            root, attrs = open_root(self.url)
            self._snapshot = Snapshot(root, stored_schema(attrs, self.url), self.counts)
            self._pid = os.getpid()
        return self._snapshot

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Tensor]]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, dict[str, Tensor]]]:
        """A batch of items read at once (DataLoader calls this with a batch of indices)."""
        n = len(self)
        positions = np.asarray([i + n if i < 0 else i for i in indices], dtype=np.int64)
        ids, rows = self._open().read_positions(positions, self.layers)
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return [(ids[j], {k: v[j] for k, v in rows.items()}) for j in range(len(positions))]
