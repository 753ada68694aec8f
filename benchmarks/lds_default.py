"""LDS of the default pipeline on the unseen ground truth: digits MLP 64-128-128-10, split 7.

    python -m benchmarks.lds_default [--data tests/data/lds_deep_mlp.npz] [--ranks full 64]

Attribution on the seed-0 model of `benchmarks.ground_truth.lds_deep_mlp` (float32) for all
497 test points against its 1300 training examples, with public pieces only: ``lf.logra``
(full gradients or LoGra rank 64), ``lf.projected_grads``, ``fit_curvature`` with no options
(``method="auto"``, ``fisher="auto"``: the exact expectation over the 10 labels, so the dense
per-layer GGN when every k ≤ 4096, else the dual GGN of all layers for its 1300 × 10 rows)
unless a row says otherwise, ``lf.preconditioner(factors)`` (default damping: 0.1 × each
layer's mean eigenvalue, 1 × for the all-layer GGN) and ``lf.influence``. Rows with sampled
labels report the mean ± sd over seeds 0, 1, 2. The LDS is against the 5-seed mean test loss
of 256 half-subset retrainings; the split-half noise ceiling is printed first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import logix_func as lf
from benchmarks.ground_truth.lds_deep_mlp import MLP, SPLIT_SEED, split_half_reliability
from logix_func.demo import digits
from logix_func.pipeline import fit_curvature

ROWS = [  # label, fit_curvature options, seeds
    ("default (auto: per-layer GGN if all k <= 4096, else dual GGN)", {}, (0,)),
    ("EKFAC, auto = exact Fisher", {"method": "ekfac"}, (0,)),
    ("EKFAC, one sampled label", {"method": "ekfac", "fisher": "true"}, (0, 1, 2)),
    ("EKFAC, empirical Fisher", {"method": "ekfac", "fisher": "empirical"}, (0,)),
    ("KFAC, auto = exact Fisher", {"method": "kfac"}, (0,)),
    ("KFAC, one sampled label", {"method": "kfac", "fisher": "true"}, (0, 1, 2)),
]


def load(path: str):
    """``(model, params, split, masks, outputs)`` of the stored ground truth (float32)."""
    data = np.load(path)
    params = {
        k.removeprefix("param0/"): torch.from_numpy(data[k])
        for k in data.files
        if k.startswith("param0/")
    }
    split = digits.digits_split(torch.float32, seed=SPLIT_SEED)
    model = digits.mlp_model(MLP["width"], torch.float32, depth=MLP["depth"])
    outputs = data["loss_per_seed"].astype(np.float64).mean(axis=1)
    return model, params, split, data["masks"], outputs, data["loss_per_seed"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tests/data/lds_deep_mlp.npz")
    parser.add_argument("--ranks", nargs="+", default=["full", "64"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, params, split, masks, outputs, per_seed = load(args.data)
    r_half, reliability = split_half_reliability(per_seed)
    print(
        f"{len(masks)} subsets x {per_seed.shape[1]} seeds: split-half {r_half:.3f}, "
        f"reliability {reliability:.3f}, LDS ceiling {np.sqrt(reliability):.3f}"
    )
    loader = list(zip(split.train_x.split(100), split.train_y.split(100), strict=True))

    def lds(query, train, factors) -> float:
        scores = lf.influence(query, train, preconditioner=lf.preconditioner(factors))
        return float(lf.lds(scores, masks, outputs, measurement="loss")[0])

    for rank in args.ranks:
        spec = lf.logra(model, rank=None if rank == "full" else int(rank))
        train = lf.projected_grads(model, params, (split.train_x, split.train_y), spec)
        query = lf.projected_grads(model, params, (split.test_x, split.test_y), spec)
        label = "full" if rank == "full" else f"LoGra {rank}"
        print(f"{label:9s} {'gradient dot products':40s} {lds(query, train, None):.3f}")
        for name, options, seeds in ROWS:
            values = [
                lds(
                    query,
                    train,
                    fit_curvature(
                        model, params, loader, spec, seed=seed, progress=False, **options
                    ),
                )
                for seed in seeds
            ]
            spread = f" ± {np.std(values):.3f}" if len(values) > 1 else ""
            print(f"{label:9s} {name:40s} {np.mean(values):.3f}{spread}", flush=True)
    print(f"time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
