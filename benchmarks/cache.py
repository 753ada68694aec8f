"""What the curvature cache costs and saves, on the digits MLP (1,300 images, batches of 100,
rank 16): ``fit_curvature`` (EKFAC, true Fisher) against the cache key alone (weights
fingerprint + one pass hashing the data) and against a hit (key + loading the factors).

``python -m benchmarks.cache``; ratios of times measured side by side in one run.
"""

from __future__ import annotations

import tempfile

import torch
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf
from benchmarks.logra_models import best_times
from logix_func._cache import curvature_record
from logix_func.demo.digits import digits_split, mlp_model, train_mlp


def main() -> None:
    data = digits_split(torch.float32)
    model = mlp_model(dtype=torch.float32).eval()
    params = train_mlp(data.train_x, data.train_y, 0)
    params = {k: v.float() for k, v in params.items()}
    spec = lf.logra(model, rank=16)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=100)
    cache = tempfile.mkdtemp()
    options = dict(method="ekfac", fisher="true", progress=False)
    lf.fit_curvature(model, params, loader, spec, cache=cache, **options)  # the entry to hit
    times = best_times(
        {
            "fit": lambda: lf.fit_curvature(model, params, loader, spec, **options),
            "key": lambda: curvature_record(
                model, params, loader, spec, method="ekfac", fisher="true", seed=0, loss_fn=None
            ),
            "hit": lambda: lf.fit_curvature(model, params, loader, spec, cache=cache, **options),
        },
        repeats=5,
    )
    fit, key, hit = times["fit"], times["key"], times["hit"]
    print(f"threads {torch.get_num_threads()}")
    print(f"fit_curvature (ekfac): {fit:.3f} s, cache key: {key:.4f} s, cache hit: {hit:.4f} s")
    print(f"key / fit: {key / fit:.3f}, hit / fit: {hit / fit:.3f}")


if __name__ == "__main__":
    main()
