"""Whole-value reads and writes at a location: a local path, a tensorstore kvstore URL, or a
kvstore spec dict (needed for what URLs cannot say, such as an S3 ``endpoint``).

Values share the stores' resource context, so ``memory://run/kfac.pt`` lives beside
``memory://run/train`` for the life of the process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import tensorstore as ts

from .layout import context, kvstore_spec, wait

Location = str | os.PathLike | Mapping[str, Any]


def join(location: Location, name: str) -> Location:
    """``location/name``: a path or URL joined with ``/``, or a spec dict with a longer path."""
    if isinstance(location, Mapping):
        spec = kvstore_spec(location)
        return {**spec, "path": spec["path"] + name}
    return f"{os.fspath(location).rstrip('/')}/{name}"


def describe(location: Location) -> str:
    """A short name of a location for messages: the URL, or the spec's URL form."""
    if not isinstance(location, Mapping):
        return os.fspath(location)
    spec = kvstore_spec(location)
    where = f"{spec['driver']}://{spec.get('bucket', '')}/{spec['path']}".replace(":///", "://")
    return where + (f" at {spec['endpoint']}" if spec.get("endpoint") else "")


def _split(location: Location) -> tuple[ts.KvStore, str]:
    spec = kvstore_spec(location)
    base, _, key = spec["path"].rstrip("/").rpartition("/")
    spec["path"] = base + "/" if base else ""
    return ts.KvStore.open(spec, context=context(durable=True)).result(), key


def write_bytes(location: Location, data: bytes) -> None:
    """Store ``data`` as the value at ``location`` (its last path component is the key)."""
    kv, key = _split(location)
    wait(kv.write(key, data), f"writing {describe(location)}")


def read_bytes(location: Location) -> bytes:
    """The value :func:`write_bytes` stored there; FileNotFoundError if there is none."""
    kv, key = _split(location)
    result = wait(kv.read(key), f"reading {describe(location)}")
    if result.state != "value":
        raise FileNotFoundError(f"nothing stored at {describe(location)}")
    return bytes(result.value)
