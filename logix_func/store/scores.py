"""Score arrays: ``[Q, N]`` float32 zarr v3 arrays written by ``influence(..., out=)``.

A scores array lives outside any store, in an empty location (it never replaces or mixes into
data it did not create), and its attributes ``{"logix_func": {...}}`` record what produced it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import tensorstore as ts
from torch import Tensor

from .layout import ATTRS_NAME, GROUP_KEY, codecs, context, kvstore_spec

MAX_PENDING = 4  # chunk writes in flight


def create_scores(
    url: str, queries: int, total: int, chunk_rows: int, attrs: dict[str, Any]
) -> ts.TensorStore:
    """A new float32 array ``[queries, total]`` at the empty location ``url``, chunked by
    ``chunk_rows`` columns, with ``attrs`` stored under ``"logix_func"``."""
    check_empty(url)
    spec = {
        "driver": "zarr3",
        "kvstore": kvstore_spec(url),
        "metadata": {
            "shape": [queries, total],
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": [queries, min(chunk_rows, total)]},
            },
            "data_type": "float32",
            "codecs": codecs("none", 4),
            "attributes": {ATTRS_NAME: attrs},
        },
        "create": True,
    }
    return ts.open(spec, context=context(durable=True)).result()


def write_columns(array: ts.TensorStore, blocks: Iterable[Tensor]) -> None:
    """Write ``[Q, n]`` blocks into consecutive columns of ``array``, a few writes in flight."""
    start, pending = 0, []
    for block in blocks:
        stop = start + block.shape[1]
        pending.append(array[:, start:stop].write(block.numpy()))
        start = stop
        if len(pending) > MAX_PENDING:
            pending.pop(0).result()
    for write in pending:
        write.result()


def open_scores(url: str | Mapping[str, Any]) -> ts.TensorStore:
    """The scores array at ``url``; `FileNotFoundError` saying how to write one if none."""
    spec = {"driver": "zarr3", "kvstore": kvstore_spec(url)}
    try:
        return ts.open(spec, open=True, context=context(durable=True)).result()
    except ValueError as e:
        problem = "it holds no zarr.json" if "NOT_FOUND" in str(e) else str(e).split("[")[0]
        raise FileNotFoundError(
            f"no scores array at {url!r} ({problem}): write one with "
            "influence(..., out=) or 'logix-func score'"
        ) from None


def scores_attrs(array: ts.TensorStore) -> dict[str, Any]:
    """The ``"logix_func"`` attributes of a scores array (empty if it has none)."""
    return array.spec().to_json()["metadata"].get("attributes", {}).get(ATTRS_NAME, {})


def check_empty(url: str) -> None:
    """``out=`` targets must be empty and outside any store: scores never replace or mix
    into data they did not create."""
    kv = kvstore_spec(url)
    path = kv.get("path", "").rstrip("/")
    if kv["driver"] == "file" and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"out={url!r} is an existing file; choose a new path for the scores")
    parts = path.split("/")
    for i in range(len(parts) - 1, 0, -1):  # the folders above: none may be a store
        above = {**kv, "path": "/".join(parts[:i]) + "/"}
        group = ts.KvStore.open(above, context=context(durable=True)).result()
        found = group.read(GROUP_KEY).result()
        if found.state == "value" and ATTRS_NAME in _attributes(found.value):
            raise FileExistsError(
                f"out={url!r} lies inside the store at {above['path']}: choose a URL outside it"
            )
    keys = ts.KvStore.open(kv, context=context(durable=True)).result().list().result()
    if keys:
        shown = ", ".join(k.decode() for k in sorted(keys)[:3])
        raise FileExistsError(
            f"out={url!r} already holds data ({len(keys)} key(s), e.g. {shown}): influence "
            "never deletes data it did not create. Choose a new URL for the scores (e.g. a new "
            "folder per run), or delete that one yourself if it is old scores"
        )


def _attributes(zarr_json: bytes) -> dict:
    """The attributes of a zarr.json (empty for anything else)."""
    try:
        node = json.loads(zarr_json)
    except ValueError:
        return {}
    return node.get("attributes", {}) if isinstance(node, dict) else {}
