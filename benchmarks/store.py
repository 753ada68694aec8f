"""LogStore throughput against a raw numpy memmap (LogIX's method), and zstd size ratios.

    python -m benchmarks.store [--rows 4096] [--repeats 9] [--dir /tmp]

Appends ``rows × 4 layers × 64×64`` float32 rows in batches, then reads them back in chunks,
with ``LogStore`` and with one ``np.memmap`` over the same bytes, the runs taking turns.
Appends are compared like for like: without fsync against a memmap left in the page cache,
durable (fsync per chunk) against a memmap flushed with msync as LogIX does. The ratio is
memmap time / store time (≥ 1: the store is faster; goal ≥ 0.8), from the best and the median
run. Last, the stored layer bytes with zstd / blosc over the raw bytes, for projected
per-sample gradients of a small MLP on digits and for Gaussian rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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


def memmap_write(path: Path, rows: dict[str, torch.Tensor], batch: int, flush: bool) -> None:
    """LogIX's way: one memmap, each batch copied into its slice, flushed (msync) at the end."""
    n = len(next(iter(rows.values())))
    sizes = {k: v[0].numel() for k, v in rows.items()}
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, sum(sizes.values())))
    for start in range(0, n, batch):
        col = 0
        for name, t in rows.items():
            block = t[start : start + batch].reshape(-1, sizes[name]).numpy()
            mm[start : start + batch, col : col + sizes[name]] = block
            col += sizes[name]
    if flush:
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


def store_write(url: str, rows: dict[str, torch.Tensor], batch: int, codec: str, *, durable: bool):
    n = len(next(iter(rows.values())))
    schema = StoreSchema.from_rows(rows, codec=codec)
    with LogStore.create(url, schema, durable=durable) as store:
        for start in range(0, n, batch):
            store.append(
                range(start, min(start + batch, n)),
                {k: v[start : start + batch] for k, v in rows.items()},
            )


def store_read(store: LogStore) -> float:
    total = 0.0
    for _, chunk in store.iter_chunks():
        for t in chunk.values():
            total += float(t[0, 0].sum())
    return total


def run_interleaved(cases: dict, repeats: int, setup=lambda: None) -> dict[str, list[tuple]]:
    """``(wall, cpu)`` seconds of each case's runs; cases take turns so load hits all alike.

    CPU time counts every thread of this process (tensorstore's too), not the kernel's
    writeback threads.
    """
    times: dict[str, list[tuple]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            setup()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def digits_projected_grads(rank: int = 8) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a digits MLP, projected P_out G P_inᵀ per layer (Gaussian P)."""
    from logix_func.demo.digits import load_digits_tensors

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
    """Stored layer bytes with zstd / blosc over the rows' raw bytes."""
    cases = {"digits MLP projected grads": digits_projected_grads()}
    cases["Gaussian rows"] = make_rows(2048, {"a": (64, 64)})
    results = []
    for label, rows in cases.items():
        for dtype in (torch.float32, torch.bfloat16):
            typed = {k: v.to(dtype) for k, v in rows.items()}
            raw = sum(t.numel() * t.element_size() for t in typed.values())
            ratios = []
            for codec in ("zstd", "blosc"):
                path = tmp / f"size-{codec}"
                store_write(str(path), typed, 256, codec, durable=False)
                ratios.append(du(path / "shards" / "0" / "layers") / raw)
                shutil.rmtree(path)
            results.append((label, str(dtype).replace("torch.", ""), *ratios))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
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

    w = run_interleaved(
        {
            "memmap": lambda: memmap_write(mm_path, rows, args.batch, flush=False),
            "memmap+flush": lambda: memmap_write(mm_path, rows, args.batch, flush=True),
            "none": lambda: store_write(url, rows, args.batch, "none", durable=False),
            "none durable": lambda: store_write(url, rows, args.batch, "none", durable=True),
            "zstd durable": lambda: store_write(url, rows, args.batch, "zstd", durable=True),
        },
        args.repeats,
        setup=clean,
    )
    clean()
    memmap_write(mm_path, rows, args.batch, flush=True)
    store_write(url, rows, args.batch, "none", durable=True)
    os.sync()  # reads start with both files clean in the page cache
    opened = LogStore.open(url)  # opened once, as a reader would (a few ms, not timed)
    reads = {
        "memmap": lambda: memmap_read(mm_path, layers, args.rows, chunk),
        "store": lambda: store_read(opened),
    }
    r = run_interleaved(reads, args.repeats)
    table = [
        ("append, none, page cache only", w["none"], w["memmap"], "memmap"),
        ("append, none, durable", w["none durable"], w["memmap+flush"], "memmap+flush"),
        ("append, zstd, durable", w["zstd durable"], w["memmap+flush"], "memmap+flush"),
        ("read (iter_chunks), none", r["store"], r["memmap"], "memmap"),
    ]
    print(
        f"{args.rows} rows × {len(layers)} layers × 64×64 float32 = {mib:.0f} MiB; "
        f"batch {args.batch}, chunk {chunk} rows; {args.repeats} interleaved runs each"
    )
    print("ratio = baseline time / store time (wall clock: best, median run; CPU: median run)")
    head = f"{'case':30} {'store MiB/s':>11} {'baseline':>13} {'MiB/s':>6}"
    print(head + f" {'ratio best':>10} {'median':>7} {'CPU':>5}")
    for label, store_t, base_t, base in table:
        store_wall, store_cpu = (list(x) for x in zip(*store_t, strict=True))
        base_wall, base_cpu = (list(x) for x in zip(*base_t, strict=True))
        speeds = f"{mib / min(store_wall):11.0f} {base:>13} {mib / min(base_wall):6.0f}"
        best = min(base_wall) / min(store_wall)
        median = statistics.median(base_wall) / statistics.median(store_wall)
        cpu = statistics.median(base_cpu) / statistics.median(store_cpu)
        print(f"{label:30} {speeds} {best:10.2f} {median:7.2f} {cpu:5.2f}")
    print()
    print(f"{'rows (stored / raw bytes)':30} {'dtype':9} {'zstd':>6} {'blosc':>6}")
    for label, dtype, zstd, blosc in size_ratios(tmp):
        print(f"{label:30} {dtype:9} {zstd:6.3f} {blosc:6.3f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
