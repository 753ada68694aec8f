"""Writer jobs that store tests run in separate processes (forked from a clean forkserver)."""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import signal
import time

import torch

from logix_func.store import LogStore, SchemaError, StoreIOError, StoreSchema, WriterConflictError

LAYERS = {"fc1": (4, 8), "fc2": (16,)}


def rows_for(ids: list[int], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Rows that depend on the data id only: the same bits whatever the batch."""
    i = torch.tensor(ids, dtype=torch.float64)[:, None]
    out = {}
    for n, (name, shape) in enumerate(LAYERS.items()):
        grid = torch.arange(math.prod(shape), dtype=torch.float64)
        values = torch.sin(i * 0.731 + grid * (n + 1.3)) * (1 + i)
        out[name] = values.to(dtype).view(len(ids), *shape)
    return out


def schema(dtype: torch.dtype = torch.bfloat16) -> StoreSchema:
    return StoreSchema(layers=LAYERS, dtype=dtype, chunk_rows=16, spec={"rank": 4, "seed": 0})


def write_ids(
    url: str, ids: list[int], writer: int, batch: int, flush_every: int, pause: float, ready=None
) -> None:
    """The logging loop of a user: resume after what is committed, append, flush now and then.

    ``ready`` (an Event) is set once the store is open.
    """
    with LogStore.create(url, schema(), writer=writer, exist_ok=True) as store:
        if ready is not None:
            ready.set()
        done = store.committed_ids()
        todo = [i for i in ids if i not in done]
        for step, start in enumerate(range(0, len(todo), batch)):
            part = todo[start : start + batch]
            store.append(part, rows_for(part))
            if flush_every and step % flush_every == 0:
                store.flush()
            time.sleep(pause)


def race_writer(url: str, ids: list[int], start, queue) -> None:
    """Log ``ids`` as writer 0 once ``start`` (a Barrier) lets every racer go; report whether
    this process was refused the writer id when opening ("refused") or later ("lost")."""
    start.wait()
    try:
        store = LogStore.create(url, schema(), writer=0, exist_ok=True)
    except WriterConflictError as e:
        queue.put(("refused", str(e)))
        return
    try:
        with store:
            for step, begin in enumerate(range(0, len(ids), 8)):
                store.append(ids[begin : begin + 8], rows_for(ids[begin : begin + 8]))
                if step % 2 == 0:
                    store.flush()
                time.sleep(0.002)
    except WriterConflictError as e:
        queue.put(("lost", str(e)))
        return
    queue.put(("ok", ids))


def race_create(url: str, layers: dict, start, queue) -> None:
    """Create (or open) a store of ``layers`` once ``start`` lets every racer go; append 5 rows."""
    start.wait()
    try:
        store_schema = StoreSchema(layers=layers, chunk_rows=4)
        with LogStore.create(url, store_schema, writer=os.getpid(), exist_ok=True) as store:
            store.append(range(os.getpid() * 8, os.getpid() * 8 + 5), rows_of(layers, 5))
    except SchemaError as e:
        queue.put(("SchemaError", str(e)))
        return
    queue.put(("ok", layers))


def rows_of(layers: dict, n: int) -> dict[str, torch.Tensor]:
    return {name: torch.ones(n, *shape) for name, shape in layers.items()}


def hold_writer(url: str, ids: list[int], ready) -> None:
    """Commit ``ids`` as writer 0, leave more rows uncommitted, and hold the writer id."""
    store = LogStore.create(url, schema(), writer=0, exist_ok=True)
    store.append(ids, rows_for(ids))
    store.flush()
    more = [i + 10_000 for i in ids]
    store.append(more, rows_for(more))  # pending until a flush that never comes
    ready.set()
    time.sleep(600)


def write_with_file_limit(url: str, limit_bytes: int, queue) -> None:
    """Append past a file-size limit (a full disk as the writer sees it); report what surfaced."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    queue.put(_outcome(lambda: _fill(url, StoreSchema(layers={"g": (256,)}, codec="none"))))


def create_as_nobody(url: str, queue) -> None:
    """Create a store after dropping root's rights (to see a read-only directory refuse it)."""
    store_schema = StoreSchema(layers={"g": (4,)})
    _fill(f"memory://{url}", store_schema)  # imports what the store needs while still root
    os.setgid(65534)
    os.setuid(65534)
    queue.put(_outcome(lambda: _fill(url, store_schema)))


def _fill(url: str, store_schema: StoreSchema) -> None:
    size = store_schema.row_sizes["g"]
    with LogStore.create(url, store_schema) as store:
        for start in range(0, 4096, 256):
            store.append(range(start, start + 256), {"g": torch.ones(256, size)})


def _outcome(fn) -> tuple[str, str]:
    try:
        fn()
    except StoreIOError as e:
        return "StoreIOError", str(e)
    except Exception as e:  # reported to the test, which names the unexpected type
        return type(e).__name__, str(e)
    return "ok", ""


def forkserver():
    """A multiprocessing context whose children fork from a server that imported torch and the
    store but never ran tensorstore: children start fast and may use tensorstore."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "logix_func.store"])  # importable from the repo root
    return ctx


def item_in_child(dataset, queue) -> None:
    """Read one item of ``dataset`` and report the outcome (run in a forked process)."""
    queue.put(_outcome(lambda: dataset[0]))
