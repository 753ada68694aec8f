"""LogStore throughput against a raw numpy memmap (LogIX's method), and zstd size ratios.

    python -m benchmarks.store [--rows 4096] [--repeats 3] [--dir /tmp]

Writes ``rows × layers`` float32 rows in batches, then reads them back in chunks, once with
``LogStore`` (codec "none") and once with ``np.memmap`` over the same bytes; prints throughput
and the ratio store / memmap (goal ≥ 0.8). Then the stored size with zstd / blosc relative to
the raw bytes, for projected per-sample gradients of a small MLP on digits and Gaussian rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import logix_func as lf
from logix_func.store import LogStore, StoreSchema


def make_rows(n: int, layers: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(n, *shape, generator=g) for name, shape in layers.items()}


def memmap_write(path: Path, rows: dict[str, torch.Tensor], batch: int) -> None:
    """LogIX's way: one memmap, each batch copied into its slice, flushed at the end."""
    n = len(next(iter(rows.values())))
    sizes = {k: v[0].numel() for k, v in rows.items()}
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, sum(sizes.values())))
    for start in range(0, n, batch):
        col = 0
        for name, t in rows.items():
            block = t[start : start + batch].reshape(-1, sizes[name]).numpy()
            mm[start : start + batch, col : col + sizes[name]] = block
            col += sizes[name]
    mm.flush()
    del mm


def memmap_read(path: Path, layers: dict[str, tuple[int, ...]], n: int, chunk: int) -> float:
    sizes = {k: int(np.prod(s)) for k, s in layers.items()}
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(n, sum(sizes.values())))
    total = 0.0
    for start in range(0, n, chunk):
        col = 0
        for name, shape in layers.items():
            block = np.array(mm[start : start + chunk, col : col + sizes[name]])
            total += float(torch.from_numpy(block).view(-1, *shape)[0, 0].sum())
            col += sizes[name]
    del mm
    return total


def store_write(url: str, rows: dict[str, torch.Tensor], batch: int, codec: str, durable: bool):
    n = len(next(iter(rows.values())))
    schema = StoreSchema.from_rows(rows, codec=codec)
    with LogStore.create(url, schema, durable=durable) as store:
        for start in range(0, n, batch):
            store.append(
                range(start, min(start + batch, n)),
                {k: v[start : start + batch] for k, v in rows.items()},
            )


def store_read(url: str) -> float:
    total = 0.0
    for _, chunk in LogStore.open(url).iter_chunks():
        for t in chunk.values():
            total += float(t[0, 0].sum())
    return total


def best_times(cases: dict, repeats: int, setup=lambda: None) -> dict[str, float]:
    """Best wall time of each case; cases run interleaved so that load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def digits_projected_grads(rank: int = 8) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a digits MLP, projected P_out G P_inᵀ per layer (Gaussian P)."""
    from logix_func.cli import load_digits_tensors

    x, y = load_digits_tensors()[:2]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    grads = lf.per_sample_grads(model, params, (x, y))
    out = {}
    for name, g in grads.items():
        p_out = torch.randn(rank, g.shape[1]) / g.shape[1] ** 0.5
        p_in = torch.randn(rank, g.shape[2]) / g.shape[2] ** 0.5
        out[name] = p_out @ g @ p_in.T
    return out


def size_ratios(tmp: Path) -> list[tuple[str, str, float, float]]:
    cases = {"digits MLP projected grads": digits_projected_grads()}
    cases["Gaussian rows"] = make_rows(2048, {"a": (64, 64)})
    results = []
    for label, rows in cases.items():
        for dtype in (torch.float32, torch.bfloat16):
            typed = {k: v.to(dtype) for k, v in rows.items()}
            sizes = {}
            for codec in ("none", "zstd", "blosc"):
                path = tmp / f"size-{codec}"
                store_write(str(path), typed, 256, codec, durable=False)
                sizes[codec] = du(path / "shards")
                shutil.rmtree(path)
            dname = str(dtype).replace("torch.", "")
            results.append(
                (label, dname, sizes["zstd"] / sizes["none"], sizes["blosc"] / sizes["none"])
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers = {f"layer{i}": (64, 64) for i in range(4)}  # LoGra rank 64 on 4 layers: 64 KiB/row
    rows = make_rows(args.rows, layers)
    mib = sum(t.numel() * 4 for t in rows.values()) / 2**20
    tmp = Path(tempfile.mkdtemp(dir=args.dir))
    mm_path, url = tmp / "rows.mmap", str(tmp / "store")

    chunk = StoreSchema.from_rows(rows).chunk_rows

    def clean():
        shutil.rmtree(url, ignore_errors=True)
        mm_path.unlink(missing_ok=True)

    writes = {
        "memmap": lambda: memmap_write(mm_path, rows, args.batch),
        "none": lambda: store_write(url, rows, args.batch, "none", False),
        "none durable": lambda: store_write(url, rows, args.batch, "none", True),
        "zstd durable": lambda: store_write(url, rows, args.batch, "zstd", True),
    }
    w = best_times(writes, args.repeats, setup=clean)
    clean()
    writes["memmap"]()
    writes["none"]()
    os.sync()  # reads start with both files clean in the page cache
    reads = {
        "memmap": lambda: memmap_read(mm_path, layers, args.rows, chunk),
        "store": lambda: store_read(url),
    }
    r = best_times(reads, args.repeats)
    table = [
        ("append, codec none", mib / w["none"], mib / w["memmap"]),
        ("append, codec none, durable", mib / w["none durable"], mib / w["memmap"]),
        ("append, codec zstd, durable", mib / w["zstd durable"], mib / w["memmap"]),
        ("read (iter_chunks), codec none", mib / r["store"], mib / r["memmap"]),
    ]

    print(
        f"{args.rows} rows × {len(layers)} layers × 64×64 float32 = {mib:.0f} MiB; "
        f"batch {args.batch}, chunk {chunk} rows, best of {args.repeats}"
    )
    print(f"{'case':34} {'store MiB/s':>12} {'memmap MiB/s':>13} {'ratio':>6}")
    for label, store_speed, mm_speed in table:
        print(f"{label:34} {store_speed:12.0f} {mm_speed:13.0f} {store_speed / mm_speed:6.2f}")
    print()
    print(f"{'rows (compressed / raw size)':30} {'dtype':9} {'zstd':>6} {'blosc':>6}")
    for label, dtype, zstd, blosc in size_ratios(tmp):
        print(f"{label:30} {dtype:9} {zstd:6.3f} {blosc:6.3f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
