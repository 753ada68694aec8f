"""Whole-value reads and writes at a URL (a local path or any tensorstore kvstore URL).

Values share the stores' resource context, so ``memory://run/kfac.pt`` lives beside
``memory://run/train`` for the life of the process.
"""

from __future__ import annotations

import tensorstore as ts

from .store.layout import _context, kvstore_spec, wait


def _split(url: str) -> tuple[ts.KvStore, str]:
    base, key = url.rstrip("/").rsplit("/", 1) if "/" in url else (".", url)
    return ts.KvStore.open(kvstore_spec(base), context=_context(durable=True)).result(), key


def write_bytes(url: str, data: bytes) -> None:
    """Store ``data`` as the value at ``url`` (its last path component is the key)."""
    kv, key = _split(url)
    wait(kv.write(key, data), f"writing {url}")


def read_bytes(url: str) -> bytes:
    """The value :func:`write_bytes` stored at ``url``; FileNotFoundError if there is none."""
    kv, key = _split(url)
    result = wait(kv.read(key), f"reading {url}")
    if result.state != "value":
        raise FileNotFoundError(f"nothing stored at {url}")
    return bytes(result.value)
