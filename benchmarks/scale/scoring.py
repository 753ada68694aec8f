"""Scoring cost as the store grows: ``influence`` against the bare read+matmul, and memory.

    python -m benchmarks.scale.scoring [--rows 1e4 3e4 1e5 3e5 1e6] [--queries 16] [--repeats 3]

For each N, a store of N synthetic float32 rows (2 layers of [8, 8], Gaussian values like
projected gradients, the default zstd codec and chunking) is written once to a temporary
folder (its files then sit in the page cache: decoding and copying are timed, not the disk).
Times, best of ``--repeats`` interleaved runs, torch on one thread:

- ``read+matmul``: the bound: every stored chunk read once (``iter_chunks`` at the stored chunk
  size) and one ``[Q, D] @ [n, D]ᵀ`` per chunk, the layers concatenated (D = 128);
- ``influence``: ``lf.influence(query, store)`` with its default ``chunk_rows`` (the stored
  chunk) and with ``chunk_rows=4096`` (smaller than the stored chunk: a read is cut in pieces);
- ``self_influence``: ``lf.self_influence(store)``.

Peak extra resident memory (kernel high-water mark reset before each call) of
``top_k(influence_chunks(...), 10)`` and of ``self_influence`` shows whether streaming keeps
memory flat in N (the ``[N]`` self-influence result itself grows by 4 bytes a row).

Writes ``benchmarks/scale/scoring.json`` (``--out``) for ``benchmarks.scale.plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch

import logix_func as lf
from logix_func.store import LogStore, StoreSchema

from ..logra_models import best_times, peak_extra_mib

LAYERS = {"layer0": (8, 8), "layer1": (8, 8)}
HERE = Path(__file__).resolve().parent


def write_store(url: str, n: int, seed: int) -> LogStore:
    g = torch.Generator().manual_seed(seed)
    block = 1 << 16
    schema = StoreSchema(layers=LAYERS)
    with LogStore.create(url, schema, durable=False) as store:
        for start in range(0, n, block):
            stop = min(start + block, n)
            rows = {k: torch.randn(stop - start, *s, generator=g) for k, s in LAYERS.items()}
            store.append(range(start, stop), rows)
    return LogStore.open(url)


def read_matmul(query: torch.Tensor, store: LogStore) -> None:
    """The bound: each stored chunk read once, one matmul per chunk."""
    for _, rows in store.iter_chunks():
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in rows.values()], 1)
        query @ flat.T


def streamed_top_k(query: dict, store: LogStore) -> None:
    lf.top_k(lf.influence_chunks(query, store), 10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, nargs="+", default=[1e4, 3e4, 1e5, 3e5, 1e6])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the stores (default: temp)")
    parser.add_argument("--out", default=str(HERE / "scoring.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    query = {k: torch.randn(args.queries, *s, generator=g) for k, s in LAYERS.items()}
    flat_query = torch.cat([v.flatten(1) for v in query.values()], 1)
    tmp = Path(tempfile.mkdtemp(dir=args.dir))
    results = []
    print(f"torch {torch.__version__}, 1 thread, os load {os.getloadavg()}, Q={args.queries}")
    head = f"{'N':>9} {'case':28} {'s':>8} {'rows/s':>10} {'vs bound':>8} {'peak MiB':>9}"
    print(head)
    try:
        for n in map(int, args.rows):
            store = write_store(str(tmp / f"s{n}"), n, seed=n)
            cases = {
                "read+matmul": partial(read_matmul, flat_query, store),
                "influence (default)": partial(lf.influence, query, store, progress=False),
                "influence (chunk_rows=4096)": partial(
                    lf.influence, query, store, chunk_rows=4096, progress=False
                ),
                "self_influence": partial(lf.self_influence, store, progress=False),
            }
            times = best_times(cases, args.repeats)
            peaks = {
                "influence_chunks → top_k": peak_extra_mib(partial(streamed_top_k, query, store)),
                "self_influence": peak_extra_mib(cases["self_influence"]),
            }
            for case, t in times.items():
                bound = times["read+matmul"] / t
                shown = f"{peaks[case]:9.1f}" if case in peaks else ""
                print(f"{n:9d} {case:28} {t:8.3f} {n / t:10.3g} {bound:8.2f} {shown}")
            print(
                f"{n:9d} {'influence_chunks → top_k':28} {'':8} {'':10} {'':8} "
                f"{peaks['influence_chunks → top_k']:9.1f}"
            )
            results.append(
                {
                    "rows": n,
                    "stored_chunk_rows": store.schema.chunk_rows,
                    "seconds": times,
                    "peak_mib": peaks,
                }
            )
            shutil.rmtree(tmp / f"s{n}")
    finally:
        shutil.rmtree(tmp)
    Path(args.out).write_text(json.dumps({"queries": args.queries, "results": results}, indent=1))


if __name__ == "__main__":
    main()
