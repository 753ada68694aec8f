"""What the per-chunk ``crc32c`` checksum costs: reads and writes of the same rows with and
without it, taking turns in one run.

    python -m benchmarks.store_checksums [--mib 256] [--repeats 7] [--dir /tmp]

Writes ``--mib`` of float32 rows ``[n, 4096]`` in the store's chunks (4096 rows) to zarr v3
arrays whose codec chains are the store's (``bytes`` then ``zstd`` or nothing) with and without
a final ``crc32c``, then reads them chunk by chunk into numpy arrays as ``iter_chunks`` does.
Prints MB/s (best of the repeats) and the ratio with / without checksum (best and median).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

from logix_func.store.layout import array_metadata, context

ROW, CHUNK = 4096, 4096


def open_array(path: Path, codec: str, checksum: bool) -> ts.TensorStore:
    meta = array_metadata(ROW, "float32", CHUNK, codec, 4)
    if not checksum:
        meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "crc32c"]
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "metadata": meta}
    return ts.open(spec, create=True, delete_existing=True, context=context(False)).result()


def write(array: ts.TensorStore, data: np.ndarray) -> None:
    for start in range(0, len(data), CHUNK):
        array[start : start + CHUNK].write(data[start : start + CHUNK]).result()


def read(array: ts.TensorStore, n: int) -> None:
    for start in range(0, n, CHUNK):
        target = np.empty((CHUNK, ROW), np.float32)
        ts.array(target).write(array[start : start + CHUNK]).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    n = (args.mib << 20) // (ROW * 4) // CHUNK * CHUNK
    data = np.random.default_rng(0).standard_normal((n, ROW), dtype=np.float32)
    mb = data.nbytes / 1e6
    print(f"{'case':<14}{'with crc32c':>12}{'without':>10}   ratio best  median (MB/s, 1 = free)")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for codec in ("none", "zstd"):
            arrays = {c: open_array(Path(tmp) / f"{codec}{c}", codec, c) for c in (True, False)}
            times: dict = {(op, c): [] for op in ("write", "read") for c in (True, False)}
            for _ in range(args.repeats):
                for c, array in arrays.items():  # taking turns
                    t = time.perf_counter()
                    write(array, data)
                    times["write", c].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    read(array, n)
                    times["read", c].append(time.perf_counter() - t)
            for op in ("write", "read"):
                on, off = times[op, True], times[op, False]
                best = min(off) / min(on)
                median = statistics.median(a / b for a, b in zip(off, on, strict=True))
                print(
                    f"{op + ', ' + codec:<14}{mb / min(on):>12.0f}{mb / min(off):>10.0f}"
                    f"   {best:>10.2f}  {median:.2f}"
                )


if __name__ == "__main__":
    main()
