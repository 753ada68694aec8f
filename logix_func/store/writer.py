"""One writer's shard: rows gather into chunk buffers, full chunks are written asynchronously,
and the commit marker moves forward once every array's chunk is durable."""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections import deque

import numpy as np

from . import lock
from .errors import WriterConflictError
from .layout import Root, array_metadata, marker, marker_key, shard_path, wait
from .schema import DTYPE_NAMES, StoreSchema


def shard_arrays(root: Root, schema: StoreSchema, writer: int, create: bool) -> dict:
    """``{"ids": array, "layers/<name>": array}`` of one shard (created when ``create``)."""

    def meta(size: int, data_type: str, itemsize: int) -> dict:
        return array_metadata(size, data_type, schema.chunk_rows, schema.codec, itemsize)

    id_meta = meta(1, "int64", 8) if schema.ids == "int" else meta(schema.id_bytes, "uint8", 1)
    paths = {"ids": (shard_path(writer), id_meta)}
    for name, size in schema.row_sizes.items():
        layer_meta = meta(size, DTYPE_NAMES[schema.dtype], schema.dtype.itemsize)
        paths[f"layers/{name}"] = (shard_path(writer, name), layer_meta)
    opened = root.arrays({path: m for path, m in paths.values()}, create)
    return {key: opened[path] for key, (path, _) in paths.items()}


class ShardWriter:
    """Appends to shard ``writer``; at most ``max_inflight`` chunk writes are pending at once.

    Holds the writer id (see ``lock.py``) from before its first write until :meth:`release`.
    """

    def __init__(self, root: Root, schema: StoreSchema, writer: int, max_inflight: int):
        self.root, self.schema, self.writer = root, schema, writer
        self.max_inflight = max_inflight
        self.key = marker_key(writer)
        self.owner = f"{lock.holder_name()}/{uuid.uuid4().hex}"
        self.guard = threading.Lock()  # marker writes: this thread and the lease renewal
        self.marker = self.lock = self.renewal = None
        self.expires = self.valid_until = float("inf")  # lease of the pending, last marker
        if root.local is not None:
            self.lock = lock.FileLock(root, writer)  # refuses a writer id in use
        elif not root.atomic:
            warnings.warn(
                f"{root.url}: use_conditional_write is off, so taking writer {writer}'s lease is "
                "a check, then a write: two processes opening the same writer id at once could "
                "both take it. Give every process its own writer id (e.g. writer=rank), or "
                "turn conditional writes on if the server supports them",
                stacklevel=3,
            )
        try:
            self._claim()
        except BaseException:
            self.release()
            raise

    def _claim(self) -> None:
        """Take the shard over (its marker, then its arrays) and reload its last partial chunk."""
        root, schema, writer = self.root, self.schema, self.writer
        old, generation = root.read_markers([writer])[0]
        if self.lock is None:
            lock.check_lease(old, writer, root.url)
        self.committed = 0 if old is None else old["rows"]
        self.generation = generation
        self.marker = self._write_marker(self.committed)
        self._check_marker()  # fails if another process claimed the shard meanwhile
        if self.lock is None:
            self.renewal = lock.Renewal(self)
        else:
            root.remove_temp_files(writer)
        self.arrays = shard_arrays(root, schema, writer, create=True)
        rows = schema.chunk_rows
        self.start = self.committed - self.committed % rows  # first row of the current chunk
        self.fill = self.committed - self.start  # rows of the current chunk held in buffers
        self.buffers = self._new_buffers()
        for key, array in self.arrays.items():  # resuming inside a chunk: keep its rows
            if self.fill:
                part = wait(array[self.start : self.committed].read(), "reading the last chunk")
                self.buffers[key][: self.fill] = part
        self.inflight: deque[tuple[int, list]] = deque()  # (rows once landed, write futures)
        self.landed = self.committed  # rows durable in the arrays

    def renew(self) -> None:
        """Extend the lease (a marker write with the same row count), unless released."""
        with self.guard:
            if self.renewal is None:
                return
            self._check_marker()
            self.marker = self._write_marker(self.committed)
            self._check_marker()

    def release(self) -> None:
        """Give the writer id up (after :meth:`flush`, or when giving up)."""
        if self.renewal is not None:
            self.renewal.stop.set()
            self.renewal = None
            try:  # end the lease now rather than at its expiry
                with self.guard:
                    self._check_marker()
                    self.marker = self._write_marker(self.committed, lease=False)
                    self._check_marker()
            except WriterConflictError:
                pass  # taken over already: nothing of ours to release
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def pending(self) -> bool:
        """Whether appended rows await a commit."""
        return self.committed < self.start + self.fill

    def _new_buffers(self) -> dict[str, np.ndarray]:
        rows = self.schema.chunk_rows
        return {
            k: np.empty((rows, a.shape[1]), a.dtype.numpy_dtype) for k, a in self.arrays.items()
        }

    def append(self, ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Append ``ids [B, id width]`` and ``rows {layer: [B, size]}`` (already checked)."""
        batch = {"ids": ids, **{f"layers/{name}": a for name, a in rows.items()}}
        chunk, done = self.schema.chunk_rows, 0
        while done < len(ids):
            take = min(chunk - self.fill, len(ids) - done)
            for key, buffer in self.buffers.items():
                buffer[self.fill : self.fill + take] = batch[key][done : done + take]
            self.fill += take
            done += take
            if self.fill == chunk:
                self._submit(handover=True)
                self.start, self.fill = self.start + chunk, 0
                self.buffers = self._new_buffers()
        self._drain(self.max_inflight)

    def flush(self) -> None:
        """Write the partial chunk, wait for every write, and commit all appended rows."""
        if self.fill and self.start + self.fill > self.landed:
            for buffer in self.buffers.values():
                buffer[self.fill :] = 0
            self._submit(handover=False)
        self._drain(0)
        with self.guard:
            self._check_marker()
            self._commit()
            self._check_marker()

    def _submit(self, handover: bool) -> None:
        """Start writing the current chunk, always whole (rows past ``fill`` are uncommitted).

        A full chunk's buffers are handed over to tensorstore (no copy, never touched again);
        a partial chunk is copied, as its buffers keep filling.
        """
        if self.renewal is not None and self.valid_until < time.time() + lock.LEASE_SECONDS / 4:
            self.renew()  # never write a chunk under a lease that may have lapsed
        end = self.start + self.schema.chunk_rows
        futures = [
            a[self.start : end]
            .write(self.buffers[k], can_reference_source_data_indefinitely=handover)
            .commit
            for k, a in self.arrays.items()
        ]
        self.inflight.append((self.start + self.fill, futures))

    def _drain(self, limit: int) -> None:
        """Wait until at most ``limit`` chunks are in flight; commit what has landed."""
        while self.inflight and (
            len(self.inflight) > limit or all(f.done() for f in self.inflight[0][1])
        ):
            end, futures = self.inflight.popleft()
            for future in futures:
                wait(future, f"writing rows of {self.root.url}")
            self.landed = end
        with self.guard:
            if self.marker is None or self.marker.done():  # else commit later: never block
                self._check_marker()
                self._commit()

    def _commit(self) -> None:
        """Start moving the commit marker to the rows that have landed."""
        if self.landed > self.committed:
            self.marker = self._write_marker(self.landed)
            self.committed = self.landed

    def _write_marker(self, rows: int, lease: bool = True):
        expires = time.time() + lock.LEASE_SECONDS if lease and self.lock is None else None
        self.expires = float("inf") if expires is None else expires
        value = marker(rows, self.owner, expires)
        return self.root.write_json(self.key, value, self.generation)

    def _check_marker(self) -> None:
        """Wait for the last marker write; it must have found the marker we wrote before."""
        if self.renewal is not None and self.renewal.error is not None:
            raise self.renewal.error
        if self.marker is None:
            return
        generation = wait(self.marker, f"committing rows of {self.root.url}").generation
        self.marker = None
        if not generation:
            raise WriterConflictError(
                f"writer {self.writer} of {self.root.url} is used by another process: its commit "
                "marker changed under us (rows appended since the last commit are not stored); "
                "give every concurrent writer its own writer id"
            )
        self.generation, self.valid_until = generation, self.expires
