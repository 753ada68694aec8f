"""Memory of ``committed_ids()`` (what a resumed logging loop holds) per stored id.

    python -m benchmarks.store_ids [--ids 1000000] [--dir /tmp]

Logs ``--ids`` int ids (one float per row) into a store, then, in this process, measures with
``tracemalloc`` the bytes still allocated after ``LogStore.open(url).committed_ids()`` (the
store's sorted id index and the set over it) and the peak while building them, then the same
with the store kept open for appending (a resumed writer: also the positions of the index, the
writer's known ids and chunk buffers); beside them, a Python ``set`` of the same ids (what
``committed_ids()`` returned before).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from logix_func.store import LogStore, StoreSchema


def measure(build) -> tuple[object, int, int]:
    """``(result, bytes retained, peak bytes)`` of ``build()``."""
    gc.collect()
    tracemalloc.start()
    result = build()
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, retained, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    n = args.ids
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        url = str(Path(tmp) / "ids")
        schema = StoreSchema(layers={"g": (1,)}, codec="none", chunk_rows=1 << 16)
        ids = np.random.default_rng(0).permutation(4 * n)[:n].astype(np.int64)
        with LogStore.create(url, schema) as store:
            for start in range(0, n, 1 << 16):
                part = torch.from_numpy(ids[start : start + (1 << 16)])
                store.append(part, {"g": torch.zeros(len(part), 1)})
        done, kept, peak = measure(lambda: LogStore.open(url).committed_ids())
        assert len(done) == n and int(ids[7]) in done
        print(f"committed_ids() of {n:,}:  {kept / n:.1f} B/id kept, {peak / n:.1f} B/id peak")
        del done

        def resume() -> tuple:
            store = LogStore.open(url, "a", writer=1)
            return store, store.committed_ids()

        (store, done), kept, peak = measure(resume)
        store.close()
        print(f"open for appending + ids:   {kept / n:.1f} B/id kept, {peak / n:.1f} B/id peak")
        del store, done
        as_set, kept, peak = measure(lambda: set(ids.tolist()))
        print(f"python set of the same ids:  {kept / n:.1f} B/id kept, {peak / n:.1f} B/id peak")


if __name__ == "__main__":
    main()
