"""Scoring throughput of ``lf.influence`` against a bare ``torch.matmul`` of the same shapes.

    python -m benchmarks.influence [--rows 50000] [--queries 64 512] [--repeats 3] [--dir /tmp]

For each layout (4 layers of [16, 16], 2 layers of [32, 32]; float32 rows of random Gaussian
values, like projected gradients) and each number of queries, times, best of ``--repeats``:

- ``matmul``: one ``torch.matmul`` of the queries ``[Q, D]`` and all rows ``[N, D]``ᵀ, layers
  concatenated beforehand (D = Σ k_out k_in), in memory: the bound (no chunks, no checks);
- ``influence, in memory``: ``lf.influence(query, rows)`` on the same tensors;
- ``influence, store none`` / ``store zstd``: ``lf.influence(query, LogStore)`` reading a local
  store written once beforehand (so its files are in the page cache: decoding and copying are
  timed, not the disk).

and prints rows/s and the ratio to ``matmul`` (goal ≥ 0.7 for the store). Rows in parentheses
time parts of the work alone (the per-row finiteness check influence runs on a chunk only when
its scores are not finite;
reading the store's chunks without scoring) to show where the time goes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch

import logix_func as lf
from logix_func.store import LogStore, StoreSchema

from .logra_models import best_times

LAYOUTS = {
    "4 × [16, 16]": {f"layer{i}": (16, 16) for i in range(4)},
    "2 × [32, 32]": {f"layer{i}": (32, 32) for i in range(2)},
}


def make_rows(n: int, layers: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, *shape, generator=g) for name, shape in layers.items()}


def concatenated(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """All layers side by side: ``[n, Σ k_out k_in]``."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in rows.values()], 1)


def read_only(store: LogStore) -> None:
    """What the store path costs before any arithmetic: reading the chunks influence reads."""
    for _ in store.iter_chunks(chunk_rows=4096):
        pass


def finite_check_only(rows: dict[str, torch.Tensor]) -> None:
    """The per-row finiteness check influence runs on a chunk whose scores are not finite
    (the same work, alone)."""
    n = len(next(iter(rows.values())))
    for start in range(0, n, 4096):
        for v in rows.values():
            torch.isfinite(v[start : start + 4096].reshape(-1, v[0].numel())).all(dim=1)


def write_store(url: str, rows: dict[str, torch.Tensor], codec: str) -> LogStore:
    n = len(next(iter(rows.values())))
    with LogStore.create(url, StoreSchema.from_rows(rows, codec=codec), durable=False) as store:
        for start in range(0, n, 4096):
            stop = min(start + 4096, n)
            store.append(range(start, stop), {k: v[start:stop] for k, v in rows.items()})
    return LogStore.open(url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--queries", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(dir=args.dir))
    print(f"{args.rows} float32 rows, torch threads {args.threads}, best of {args.repeats}")
    print(f"{'layout':13} {'Q':>5} {'case':24} {'rows/s':>11} {'ratio':>6}")
    try:
        for layout, layers in LAYOUTS.items():
            rows = make_rows(args.rows, layers, seed=0)
            stores = {
                c: write_store(str(tmp / f"{c}-{len(layers)}"), rows, c) for c in ("none", "zstd")
            }
            for q in args.queries:
                query = make_rows(q, layers, seed=1)
                flat_query, flat_rows = concatenated(query), concatenated(rows)
                expected = torch.matmul(flat_query, flat_rows.T)
                for store in stores.values():  # same scores, and a warm page cache
                    torch.testing.assert_close(
                        lf.influence(query, store), expected, rtol=0, atol=1e-3
                    )
                cases = {
                    "matmul": partial(torch.matmul, flat_query, flat_rows.T),
                    "influence, in memory": partial(lf.influence, query, rows),
                    "influence, store none": partial(lf.influence, query, stores["none"]),
                    "influence, store zstd": partial(lf.influence, query, stores["zstd"]),
                    "(finite check alone)": partial(finite_check_only, rows),
                    "(read alone, none)": partial(read_only, stores["none"]),
                    "(read alone, zstd)": partial(read_only, stores["zstd"]),
                }
                times = best_times(cases, args.repeats, warm_up=False)
                for name, t in times.items():
                    ratio = times["matmul"] / t
                    print(f"{layout:13} {q:5d} {name:24} {args.rows / t:11.3g} {ratio:6.2f}")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
