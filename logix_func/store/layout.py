"""Where things live under a store's URL, and the few key-value operations the store uses.

Layout (keys relative to the store's root)::

    zarr.json                        zarr v3 group; attributes["logix_func"] = schema and info
    commits/<writer>.json            commit marker: {"rows", "owner", "expires", "crc32"}
    shards/<writer>/writer.lock      local files: the writer's OS lock (see lock.py)
    shards/<writer>/ids/             zarr v3 array [capacity, 1] int64 or [capacity, id_bytes] uint8
    shards/<writer>/layers/<layer>/  zarr v3 array [capacity, row size] of the schema's dtype
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

import tensorstore as ts

from .errors import CorruptStoreError, NotAStoreError, StoreError, StoreIOError

CAPACITY = 1 << 40  # rows a shard can hold; only the committed prefix is ever read
GROUP_KEY = "zarr.json"
ATTRS_NAME = "logix_func"
MARKER_NAME = re.compile(r"commits/(0|[1-9][0-9]*)\.json")  # ASCII digits only, no leading 0
_CORRUPT = ("DATA_LOSS", "Digest mismatch", "Data corruption")
_shared_context: ts.Context | None = None


def wait(future: Any, what: str) -> Any:
    """The result of a tensorstore future; storage failures become :class:`StoreIOError`."""
    try:
        return future.result()
    except ValueError as e:
        if any(sign in str(e) for sign in _CORRUPT):
            raise CorruptStoreError(
                f"{what}: a stored file is damaged (its checksum does not match): {e}. Restore "
                "the file named here from a copy, or log its rows again into a new store; "
                "chunks of other shards and other rows stay readable"
            ) from e
        raise StoreIOError(f"{what}: {e}") from e


def kvstore_spec(url: str | Mapping[str, Any]) -> dict:
    """A tensorstore kvstore spec for ``url``: a local path, a URL (``file://``, ``memory://``,
    ``gs://``, ``s3://``...) or a kvstore spec dict (e.g. ``{"driver": "s3", "bucket": ...,
    "path": ..., "endpoint": ...}`` for an S3-compatible server: URLs carry no endpoint).

    S3 specs get ``use_conditional_write: true`` unless they set it: tensorstore otherwise
    uses conditional PUTs only on AWS endpoints and a check-then-write elsewhere, under which
    two processes could both take a writer's lease (see ``lock.py``).
    """
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if isinstance(url, Mapping):
        try:
            spec = ts.KvStore.Spec(dict(url)).to_json()
        except (ValueError, TypeError) as e:
            raise StoreError(f"{dict(url)!r} is not a tensorstore kvstore spec: {e}") from None
    elif "://" not in url:
        spec = {"driver": "file", "path": os.path.abspath(os.path.expanduser(url))}
    else:
        try:
            spec = ts.KvStore.Spec(url).to_json()
        except ValueError as e:
            raise StoreError(f"{url!r} is not a tensorstore kvstore URL: {e}") from None
    if spec.get("driver") == "s3":
        spec.setdefault("use_conditional_write", True)
    path = spec.get("path", "")
    spec["path"] = path if not path or path.endswith("/") else path + "/"
    return spec


def context(durable: bool) -> ts.Context:
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


def codecs(codec: str, itemsize: int) -> list[dict]:
    """The zarr v3 codec chain for ``codec`` (``"zstd"``, ``"blosc"`` or ``"none"``), ending
    in a ``crc32c`` checksum of the encoded chunk."""
    chain: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec == "zstd":
        chain.append({"name": "zstd", "configuration": {"level": 3, "checksum": False}})
    elif codec == "blosc":
        config = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle", "typesize": itemsize}
        chain.append({"name": "blosc", "configuration": {**config, "blocksize": 0}})
    chain.append({"name": "crc32c"})
    return chain


class Root:
    """The store's root key-value store, opened once."""

    def __init__(self, url: str | Mapping[str, Any], durable: bool = True):
        self.url = url
        self.spec = kvstore_spec(url)
        self.context = context(durable)
        self.kv = wait(ts.KvStore.open(self.spec, context=self.context), f"opening {url}")

    @property
    def atomic(self) -> bool:
        """Whether conditional writes are atomic here (local files are locked instead)."""
        return not (self.spec["driver"] == "s3" and not self.spec["use_conditional_write"])

    @property
    def local(self) -> str | None:
        """The root's directory when the store is on local files, else ``None``."""
        return self.spec["path"] if self.spec.get("driver") == "file" else None

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
                if key == GROUP_KEY:
                    raise NotAStoreError(
                        f"{self.url}/{key} is not JSON: not a logix_func store"
                    ) from None
                raise CorruptStoreError(
                    f"{self.url}/{key} is not valid JSON (truncated or damaged): {_repair(key)}"
                ) from None
        return out

    def read_markers(self, writers: list[int]) -> list[tuple[dict | None, bytes]]:
        """Commit markers of ``writers`` (``None`` when missing) and their generations, checked."""
        keys = [marker_key(w) for w in writers]
        out = self.read_jsons(keys)
        for key, (marker, _) in zip(keys, out, strict=True):
            if marker is not None:
                check_marker(marker, f"{self.url}/{key}", key)
        return out

    def write_json(self, key: str, value: Any, if_equal: bytes | None = None) -> Any:
        """Start writing ``value`` (only if the key's generation is ``if_equal``, when given).

        Returns a future of the new generation; an empty generation means the condition failed.
        """
        return self.kv.write(key, json.dumps(value).encode(), if_equal=if_equal)

    def create_json(self, key: str, value: Any) -> bool:
        """Write ``value`` only if ``key`` does not exist, atomically; whether it was written.

        Local files: a temporary file hard-linked to the key (``link`` fails if it exists; a
        conditional write there is a check and a rename, two steps). Other kvstores: a write
        conditioned on the key's absence.
        """
        data = json.dumps(value).encode()
        if self.local is None:
            existing, absent = self.read_json(key)  # ``absent``: the generation of no value
            if existing is not None:
                return False
            written = wait(self.kv.write(key, data, if_equal=absent), f"creating {self.url}")
            return bool(written.generation)
        path = os.path.join(self.local, key)
        temp = f"{path}.{uuid.uuid4().hex}.create"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links here: exclusive create, then write
                with open(path, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise StoreIOError(f"creating {self.url}: {e}") from e
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def writers(self) -> list[int]:
        """Ids of the writers that have a commit marker, ascending (other names are ignored)."""
        keys = wait(self.kv.list(ts.KvStore.KeyRange("commits/", "commits0")), "listing shards")
        found = (MARKER_NAME.fullmatch(k.decode(errors="replace")) for k in keys)
        return sorted(int(m[1]) for m in found if m)

    def remove_temp_files(self, writer: int) -> None:
        """Delete the ``*.__lock`` temporary files that killed writes of ``writer`` left
        (local files only; call only while holding the writer's lock)."""
        if self.local is None:
            return
        own = re.compile(rf"{writer}\.json(_[0-9a-f]+)?\.__lock")
        commits = os.path.join(self.local, "commits")
        paths = [os.path.join(commits, n) for n in _listdir(commits) if own.fullmatch(n)]
        for folder, _, names in os.walk(os.path.join(self.local, "shards", str(writer))):
            paths += [os.path.join(folder, n) for n in names if n.endswith(".__lock")]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def arrays(self, metadata: dict[str, dict], create: bool) -> dict[str, ts.TensorStore]:
        """Open zarr v3 arrays ``{path: metadata}`` concurrently (created when absent and
        ``create``). Shape, chunk shape and data type must be those of ``metadata`` (crafted
        sizes are errors, never huge allocations); the codecs are those stored (older stores
        have no checksums). Reading a chunk that is missing is an error, never zeros."""

        def start(path: str, meta: dict, make: bool) -> Any:
            kvstore = {**self.spec, "path": self.spec["path"] + path + "/"}
            spec = {
                "driver": "zarr3",
                "kvstore": kvstore,
                "fill_missing_data_reads": False,
                "store_data_equal_to_fill_value": True,  # all-zero chunks are stored too
            }
            if make:
                return ts.open({**spec, "metadata": meta}, context=self.context, create=True)
            fixed = {k: meta[k] for k in ("shape", "chunk_grid", "data_type")}
            return ts.open({**spec, "metadata": fixed}, context=self.context, open=True)

        futures = {p: start(p, m, False) for p, m in metadata.items()}
        opened = {}
        for path, future in futures.items():
            try:
                opened[path] = future.result()
            except ValueError as e:
                if create and "NOT_FOUND" in str(e):
                    made = start(path, metadata[path], True)
                    opened[path] = wait(made, f"creating array {self.url}/{path}")
                elif "Expected" in str(e) or "FAILED_PRECONDITION" in str(e):
                    raise CorruptStoreError(
                        f"array {self.url}/{path} does not match the store's schema ({e}): "
                        f"damaged or written by another tool; {_repair(path)}"
                    ) from None
                else:
                    raise StoreIOError(f"opening array {self.url}/{path}: {e}") from e
        return opened


def marker_key(writer: int) -> str:
    return f"commits/{writer}.json"


def shard_path(writer: int, layer: str | None = None) -> str:
    return f"shards/{writer}/ids" if layer is None else f"shards/{writer}/layers/{layer}"


def marker(rows: int, owner: str, expires: float | None) -> dict:
    """A commit marker; ``crc32`` covers the other fields, so a damaged marker is detected."""
    fields = {"rows": rows, "owner": owner, "expires": expires}
    return {**fields, "crc32": zlib.crc32(json.dumps(fields, sort_keys=True).encode())}


def check_marker(value: Any, where: str, key: str) -> None:
    """Raise :class:`CorruptStoreError` unless ``value`` is a sound commit marker (markers
    written before checksums have no ``crc32`` and are checked for their fields only)."""
    fields = {k: v for k, v in value.items() if k != "crc32"} if isinstance(value, dict) else {}
    rows = fields.get("rows")
    problem = None
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows < CAPACITY:
        problem = f"its row count {rows!r} is not a count"
    elif "crc32" in value and value["crc32"] != zlib.crc32(
        json.dumps(fields, sort_keys=True).encode()
    ):
        problem = "its checksum does not match"
    if problem:
        raise CorruptStoreError(f"commit marker {where} is damaged ({problem}): {_repair(key)}")


def _repair(key: str) -> str:
    """What to do about a damaged key."""
    if not key.startswith(("commits/", "shards/")):
        return "restore it from a copy"
    writer = key.split("/")[1].split(".")[0]
    return (
        f"restore it from a copy, or move commits/{writer}.json and shards/{writer}/ out of "
        "the store to read the other writers' rows (then log that writer's rows again)"
    )


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


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
