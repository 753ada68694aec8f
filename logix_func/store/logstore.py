"""``LogStore``: rows keyed by data id on tensorstore (zarr v3), crash-safe and resumable."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .._version import __version__
from .errors import (
    DuplicateIdError,
    SchemaError,
    StoreError,
    listed,
)
from .idset import IdSet, KnownIds, lookup
from .layout import ATTRS_NAME, GROUP_KEY, Root
from .reader import Ids, LogDataset, Snapshot
from .schema import StoreSchema
from .stored import open_root, stored_attrs, stored_schema
from .writer import ShardWriter

OnDuplicate = Literal["error", "skip"]


class LogStore:
    """Rows ``{layer: [*shape]}`` keyed by unique data ids, in a zarr v3 store at ``url``.

    Use :meth:`create` or :meth:`open`. Every writer (e.g. one per rank, ``writer=rank``)
    appends to its own shard; readers see the committed rows of all shards, ordered by writer
    id, then append order. Rows become visible only once committed: after a chunk of rows is
    durable, or after :meth:`flush` / :meth:`close`. A writer that dies loses only uncommitted
    rows; reopen with the same ``writer`` and skip :meth:`committed_ids` to resume.
    """

    def __init__(
        self,
        root: Root,
        attrs: dict,
        mode: Literal["r", "a"],
        writer: int,
        on_duplicate: OnDuplicate,
        max_inflight: int,
    ):
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if on_duplicate not in ("error", "skip"):
            raise ValueError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        _check_writer(writer)
        self._root = root
        self.url = root.url
        self.attrs = attrs
        self.schema = stored_schema(attrs, root.url)
        self.writer = writer
        self.on_duplicate = on_duplicate
        self._snapshot: Snapshot | None = None
        self._shard: ShardWriter | None = None
        self._failed: Exception | None = None
        if mode == "a":
            self._shard = ShardWriter(root, self.schema, writer, max_inflight)
            try:
                self._known = KnownIds(self._snap().index()[0])
            except BaseException:
                self._shard.release()
                raise

    @classmethod
    def create(
        cls,
        url: str | Mapping[str, Any],
        schema: StoreSchema,
        *,
        writer: int = 0,
        exist_ok: bool = False,
        on_duplicate: OnDuplicate = "error",
        max_inflight: int = 4,
        durable: bool = True,
    ) -> LogStore:
        """Create a store at ``url`` and open it for appending as ``writer``.

        Args:
            url: local path, ``memory://name``, any tensorstore kvstore URL (``gs://``,
                ``s3://``...) or a kvstore spec dict (e.g. an S3 server's ``endpoint``).
            schema: the rows' layout, see :class:`StoreSchema`.
            writer: this process's shard (e.g. its rank); one process per writer id at a time.
            exist_ok: open an existing store instead of failing, if its schema is ``schema``.
            on_duplicate: ``"error"`` on a data id already stored, or ``"skip"`` its row.
            max_inflight: chunk writes pending before :meth:`append` waits.
            durable: fsync local files before committing (off: survives process crashes only).
        """
        _check_writer(writer)
        root = Root(url, durable)
        info = {
            "schema": schema.to_json(),
            "version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        group = {"zarr_format": 3, "node_type": "group", "attributes": {ATTRS_NAME: info}}
        existing, _ = root.read_json(GROUP_KEY)
        if existing is None and not root.create_json(GROUP_KEY, group):
            existing, _ = root.read_json(GROUP_KEY)  # another process created it meanwhile
        if existing is not None:
            info = stored_attrs(existing, url)
            if not exist_ok:
                raise StoreError(
                    f"{url} already holds a store; open it with LogStore.open(url, mode='a') "
                    "or pass exist_ok=True"
                )
            differences = stored_schema(info, url).differences(schema)
            if differences:
                raise SchemaError(f"{url} holds a different schema: " + "; ".join(differences))
        return cls(root, info, "a", writer, on_duplicate, max_inflight)

    @classmethod
    def open(
        cls,
        url: str | Mapping[str, Any],
        mode: Literal["r", "a"] = "r",
        *,
        writer: int = 0,
        on_duplicate: OnDuplicate = "error",
        max_inflight: int = 4,
        durable: bool = True,
    ) -> LogStore:
        """Open the store at ``url`` to read (``mode="r"``) or to append as ``writer`` (``"a"``)."""
        root, attrs = open_root(url, durable)
        return cls(root, attrs, mode, writer, on_duplicate, max_inflight)

    # writing

    def append(self, data_ids: Any, rows: Mapping[str, Float[Tensor, "batch ..."]]) -> int:
        """Queue rows ``{layer: [B, *shape]}`` of ``B`` data ids for writing; returns how many
        rows were taken (fewer than ``B`` only with ``on_duplicate="skip"``).

        Writes run in the background (at most ``max_inflight`` chunks pending): the caller's
        next batch computes meanwhile. Storage errors surface here or in :meth:`flush`.
        """
        if self._shard is None:
            raise StoreError(f"{self.url} is open for reading; open it with mode='a' to append")
        if self._failed is not None:
            raise StoreError(f"writing {self.url} failed earlier: {self._failed}")
        raw, keys = self.schema.encode_ids(data_ids)
        arrays = self.schema.rows_to_numpy(rows, len(keys))
        _check_finite(rows, keys)
        if len(set(keys)) != len(keys):
            repeated = sorted({k for k in keys if keys.count(k) > 1}, key=str)
            raise DuplicateIdError(
                f"data ids repeated within the batch: {listed(repeated)}", repeated
            )
        column = self.schema.id_column(raw)
        known = self._known.contains(column)
        if known.any():
            if self.on_duplicate == "error":
                stored = [k for k, hit in zip(keys, known, strict=True) if hit]
                raise DuplicateIdError(
                    f"data ids already in {self.url}: {listed(stored)} (skip them with "
                    "committed_ids(), or open the store with on_duplicate='skip')",
                    stored,
                )
            raw, column = raw[~known], column[~known]
            arrays = {name: a[~known] for name, a in arrays.items()}
        try:
            self._shard.append(raw, arrays)
        except Exception as e:
            self._failed = e
            raise
        self._known.add(column)
        return len(column)

    def flush(self) -> None:
        """Wait for every pending write and commit all appended rows."""
        if self._shard is None:
            return
        if self._failed is not None:
            raise StoreError(f"writing {self.url} failed earlier: {self._failed}")
        try:
            self._shard.flush()
        except Exception as e:
            self._failed = e
            raise
        self._snapshot = None

    def close(self) -> None:
        """Flush, stop writing and give the writer id up; the store stays readable."""
        shard = self._shard
        try:
            if shard is not None and self._failed is None:
                self.flush()
        finally:
            if shard is not None:
                shard.release()
            self._shard = None

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        shard = getattr(self, "_shard", None)
        if shard is not None and self._failed is None and shard.pending():
            warnings.warn(
                f"LogStore {self.url} was not closed: appended rows are not committed; "
                "call close() or use a with block",
                ResourceWarning,
                stacklevel=2,
            )

    # reading

    def __len__(self) -> int:
        """Committed rows, as of opening (or the last :meth:`flush` / :meth:`refresh`)."""
        return len(self._snap())

    def refresh(self) -> None:
        """See rows committed by other writers since the store was opened."""
        self._snapshot = None

    def ids(self) -> Ids:
        """All committed data ids in read order: an int64 tensor, or a list of strings."""
        return self._snap().decode(self._snap().all_ids())

    def committed_ids(self) -> IdSet:
        """The committed data ids, a read-only set (8 bytes per int id): skip these when
        resuming a logging loop. Ids stored twice (see :meth:`check_unique`) appear once."""
        return IdSet(self._snap().unique_ids(), self.schema.ids == "str")

    def check_unique(self) -> None:
        """Raise :class:`DuplicateIdError` if two writers stored the same data id (it names
        some of them, their writers and how to repair); scoring calls this first."""
        repeated = self._snap().repeated()
        if len(repeated):
            raise self._snap().duplicate_error(repeated, "cannot score")

    def iter_chunks(
        self,
        layers: Sequence[str] | None = None,
        chunk_rows: int | None = None,
        prefetch: int = 1,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[tuple[Ids, dict[str, Tensor]]]:
        """Yield ``(ids, {layer: [n, *shape]})`` over the committed rows in read order.

        ``n <= chunk_rows`` (default: the stored chunk size; a chunk never spans two writers'
        shards). While the caller works on a chunk, the next ``prefetch`` are read in the
        background (more read-ahead costs CPU: each read maps chunk files). ``start``/``stop``
        restrict the rows to read positions ``[start, stop)`` (e.g. one rank's block).
        """
        chunk_rows = self.schema.chunk_rows if chunk_rows is None else int(chunk_rows)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        snap = self._snap()
        stop = len(snap) if stop is None else stop
        if not 0 <= start <= stop <= len(snap):
            raise IndexError(f"rows [{start}, {stop}) out of range for a store of {len(snap)} rows")
        return snap.chunks(layers, chunk_rows, max(0, prefetch), start, stop)

    def read(
        self, data_ids: Any, layers: Sequence[str] | None = None
    ) -> dict[str, Float[Tensor, "n ..."]]:
        """Rows ``{layer: [n, *shape]}`` of ``data_ids``, in the order given."""
        snap = self._snap()
        raw, keys = self.schema.encode_ids(data_ids)
        sorted_ids, order = snap.index()
        column = self.schema.id_column(raw)
        at, found = lookup(sorted_ids, column)
        if not found.all():
            missing = [k for k, f in zip(keys, found, strict=True) if not f]
            raise KeyError(f"data ids not in {self.url}: {listed(missing)}")
        ambiguous = lookup(snap.repeated(), column)[1]
        if ambiguous.any():
            raise snap.duplicate_error(np.unique(column[ambiguous]), "cannot read")
        return snap.read_positions(order[at], layers)[1]

    def dataset(self, layers: Sequence[str] | None = None) -> LogDataset:
        """A map-style ``torch.utils.data.Dataset`` over the committed rows (see LogDataset)."""
        return LogDataset(self.url, self._snap().counts, layers)

    # what the store holds

    @property
    def spec(self) -> Any:
        """The :class:`~logix_func.ProjectionSpec` the rows were computed with (``None`` if the
        schema records none; the raw dict if it is not a ProjectionSpec's)."""
        from .._projection import ProjectionSpec

        data = self.schema.spec
        if data is None:
            return None
        try:
            return ProjectionSpec.from_dict(data)
        except (ValueError, KeyError, TypeError):
            return data

    @property
    def provenance(self) -> dict[str, str | None]:
        """``{"spec": tag, "weights": fingerprint, "loss": name}`` recorded by the schema
        (``None`` entries where it records none); influence checks it against the query."""
        from .._origin import store_provenance

        return store_provenance(self)

    @property
    def layers(self) -> dict[str, tuple[int, ...]]:
        """Row shape per layer, ``{layer: shape}``."""
        return dict(self.schema.layers)

    @property
    def dtype(self) -> torch.dtype:
        """The stored rows' dtype."""
        return self.schema.dtype

    @property
    def writers(self) -> dict[int, int]:
        """Committed rows per writer id, ``{writer: rows}`` (writers with rows only)."""
        return dict(self._snap().counts)

    @property
    def nbytes(self) -> int:
        """Bytes of the committed rows, uncompressed (ids excluded): rows × row bytes."""
        return len(self) * sum(self.schema.row_sizes.values()) * self.schema.dtype.itemsize

    def __repr__(self) -> str:
        mode = "a" if self._shard is not None else "r"
        layers = list(self.schema.layers)
        return f"LogStore({self.url!r}, mode={mode!r}, rows={len(self)}, layers={layers})"

    # helpers

    def _snap(self) -> Snapshot:
        if self._snapshot is None:
            self._snapshot = Snapshot.take(self._root, self.schema)
        return self._snapshot


def _check_writer(writer: Any) -> None:
    if not isinstance(writer, int) or isinstance(writer, bool) or writer < 0:
        raise ValueError(f"writer must be a non-negative int (e.g. the rank), got {writer!r}")


def _check_finite(rows: Mapping[str, Tensor], keys: list) -> None:
    """Refuse rows with NaN or inf before they are stored, naming their data ids."""
    bad = {name: ~torch.isfinite(t.reshape(len(keys), -1)).all(dim=1) for name, t in rows.items()}
    layers = [name for name, b in bad.items() if b.any()]
    if layers:
        rows_bad = torch.stack([bad[name] for name in layers]).any(0)
        ids = [keys[i] for i in rows_bad.nonzero().flatten().tolist()]
        raise ValueError(
            f"non-finite values (NaN or inf) for data ids {listed(ids)} (layers {layers}): "
            "nothing of this batch was stored; check the loss and inputs of those examples"
        )


def _version() -> str:
    return __version__
