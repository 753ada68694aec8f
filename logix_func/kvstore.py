"""URLs to tensorstore kvstore specs, and whole-value reads and writes."""

from __future__ import annotations

import os

import tensorstore as ts

# One shared resource context, so that ``memory://`` values outlive a single open.
CONTEXT = ts.Context()


def kvstore_spec(url: str) -> dict | str:
    """A tensorstore kvstore spec for ``url``: a local path, or any URL tensorstore knows."""
    if "://" in url:
        return url
    return {"driver": "file", "path": os.path.abspath(url)}


def write_bytes(url: str, data: bytes) -> None:
    """Store ``data`` as the value at ``url`` (its last path component is the key)."""
    base, key = url.rstrip("/").rsplit("/", 1) if "/" in url else (".", url)
    kv = ts.KvStore.open(kvstore_spec(base + "/"), context=CONTEXT).result()
    kv.write(key, data).result()


def read_bytes(url: str) -> bytes:
    """The value :func:`write_bytes` stored at ``url``; FileNotFoundError if there is none."""
    base, key = url.rstrip("/").rsplit("/", 1) if "/" in url else (".", url)
    kv = ts.KvStore.open(kvstore_spec(base + "/"), context=CONTEXT).result()
    result = kv.read(key).result()
    if result.state != "value":
        raise FileNotFoundError(f"nothing stored at {url}")
    return bytes(result.value)
