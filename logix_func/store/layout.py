"""Where things live under a store's URL, and the few key-value operations the store uses.

Layout (keys relative to the store's root)::

    zarr.json                        zarr v3 group; attributes["logix_func"] = schema and info
    commits/<writer>.json            commit marker of one writer: {"rows": n, "owner": token}
    shards/<writer>/ids/             zarr v3 array [capacity, 1] int64 or [capacity, id_bytes] uint8
    shards/<writer>/layers/<layer>/  zarr v3 array [capacity, row size] of the schema's dtype
"""

from __future__ import annotations

import json
import os
from typing import Any

import tensorstore as ts

from .errors import NotAStoreError, StoreError, StoreIOError

CAPACITY = 1 << 40  # rows a shard can hold; only the committed prefix is ever read
GROUP_KEY = "zarr.json"
ATTRS_NAME = "logix_func"
_shared_context: ts.Context | None = None


def wait(future: Any, what: str) -> Any:
    """The result of a tensorstore future; storage failures become :class:`StoreIOError`."""
    try:
        return future.result()
    except ValueError as e:
        raise StoreIOError(f"{what}: {e}") from e


def kvstore_spec(url: str) -> dict:
    """A tensorstore kvstore spec for ``url``: a local path, ``memory://``, ``gs://``, ``s3://``..."""
    if "://" not in url:
        spec = {"driver": "file", "path": os.path.abspath(os.path.expanduser(url))}
    else:
        try:
            spec = ts.KvStore.Spec(url).to_json()
        except ValueError as e:
            raise StoreError(f"{url!r} is not a tensorstore kvstore URL: {e}") from None
    path = spec.get("path", "")
    spec["path"] = path if not path or path.endswith("/") else path + "/"
    return spec


def _context(durable: bool) -> ts.Context:
    """A context sharing ``memory://`` stores across opens in this process.

    Local files: each write goes to a temporary file with a unique name that is renamed over
    the key (locking "none"; the default lock mode reuses a ``<key>.__lock`` file left by a
    killed writer without truncating it, which corrupts the next value). Writes are fsync'ed
    before they count as done when ``durable``; reads map files (chunk files are replaced,
    never changed in place).
    """
    global _shared_context
    if _shared_context is None:
        _shared_context = ts.Context()
    spec = {
        "file_io_sync": durable,
        "file_io_locking": {"mode": "none"},
        "file_io_mode": {"mode": "memmap"},
    }
    return ts.Context(spec, parent=_shared_context)


def marker_key(writer: int) -> str:
    return f"commits/{writer}.json"


def shard_path(writer: int, layer: str | None = None) -> str:
    return f"shards/{writer}/ids" if layer is None else f"shards/{writer}/layers/{layer}"


def codecs(codec: str, itemsize: int) -> list[dict]:
    """The zarr v3 codec chain for ``codec`` (``"zstd"``, ``"blosc"`` or ``"none"``)."""
    chain: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec == "zstd":
        chain.append({"name": "zstd", "configuration": {"level": 3, "checksum": False}})
    elif codec == "blosc":
        config = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle", "typesize": itemsize}
        chain.append({"name": "blosc", "configuration": {**config, "blocksize": 0}})
    return chain


class Root:
    """The store's root key-value store, opened once."""

    def __init__(self, url: str, durable: bool = True):
        self.url = url
        self.spec = kvstore_spec(url)
        self.context = _context(durable)
        self.kv = wait(ts.KvStore.open(self.spec, context=self.context), f"opening {url}")

    def read_json(self, key: str) -> tuple[Any, bytes]:
        """``(value or None when missing, storage generation)`` of a JSON key."""
        return self.read_jsons([key])[0]

    def read_jsons(self, keys: list[str]) -> list[tuple[Any, bytes]]:
        """:meth:`read_json` of several keys, read concurrently."""
        futures = [self.kv.read(key) for key in keys]
        out = []
        for key, future in zip(keys, futures, strict=True):
            r = wait(future, f"reading {self.url}/{key}")
            if r.state == "missing":
                out.append((None, r.stamp.generation))
                continue
            try:
                out.append((json.loads(r.value), r.stamp.generation))
            except ValueError:
                raise NotAStoreError(
                    f"{self.url}/{key} is not JSON: not a logix_func store"
                ) from None
        return out

    def write_json(self, key: str, value: Any, if_equal: bytes | None = None) -> Any:
        """Start writing ``value`` (only if the key's generation is ``if_equal``, when given).

        Returns a future of the new generation; an empty generation means the condition failed.
        """
        return self.kv.write(key, json.dumps(value).encode(), if_equal=if_equal)

    def writers(self) -> list[int]:
        """Ids of the writers that have a commit marker, ascending."""
        keys = wait(self.kv.list(ts.KvStore.KeyRange("commits/", "commits0")), "listing shards")
        names = [k.decode()[len("commits/") : -len(".json")] for k in keys]
        return sorted(int(n) for n in names if n.isdigit())

    def arrays(self, metadata: dict[str, dict | None]) -> dict[str, ts.TensorStore]:
        """Open zarr v3 arrays ``{path: metadata}`` concurrently; an array with metadata is
        created when absent. Reading a chunk that is missing is an error, never zeros."""
        futures = {}
        for path, meta in metadata.items():
            kvstore = {**self.spec, "path": self.spec["path"] + path + "/"}
            spec = {"driver": "zarr3", "kvstore": kvstore, "fill_missing_data_reads": False}
            if meta is None:
                futures[path] = ts.open(spec, context=self.context, open=True, read=True)
            else:
                spec["metadata"] = meta
                futures[path] = ts.open(spec, context=self.context, open=True, create=True)
        return {p: wait(f, f"opening array {self.url}/{p}") for p, f in futures.items()}


def array_metadata(row_size: int, data_type: str, chunk_rows: int, codec: str, itemsize: int):
    """zarr v3 metadata of a ``[CAPACITY, row_size]`` array chunked along rows."""
    return {
        "shape": [CAPACITY, row_size],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, row_size]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "data_type": data_type,
        "codecs": codecs(codec, itemsize),
        "fill_value": 0,
    }
