"""LDS of the attribution pipeline on the digits MLP, over preconditioners, Fishers and dampings.

    python -m benchmarks.lds_pipeline [--ranks full 8 16] [--queries 497]

Scores the 497 test examples against the 1300 training examples of the stored MLP
(tests/data/lds_mlp.npz) with public pieces only (``lf.logra``, ``lf.projected_grads``,
``fit_curvature``, ``lf.preconditioner``, ``lf.influence``) and prints the LDS against the
retraining ground truth for each projection rank, preconditioner (identity, KFAC, EKFAC, raw,
the per-layer GGN), Fisher (exact, true = one sampled label, empirical) and damping
(default = 0.1 × each layer's mean eigenvalue; ``wd`` = the objective's weight decay, 1e-3).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import logix_func as lf
from logix_func.demo import digits
from logix_func.pipeline import fit_curvature

DAMPINGS = {"default": None, "wd": digits.MLP_WEIGHT_DECAY}
CURVATURES = [
    ("kfac", "exact"),
    ("kfac", "true"),
    ("ekfac", "exact"),
    ("ekfac", "true"),
    ("raw", "empirical"),
    ("raw", "true"),
    ("ggn", "exact"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", default=["full", "8", "16"])
    parser.add_argument("--queries", type=int, default=497)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = np.load("tests/data/lds_mlp.npz")
    params = {k.removeprefix("param/"): torch.from_numpy(data[k]) for k in data.files if "/" in k}
    split = digits.digits_split()
    model = digits.mlp_model()
    loader = list(zip(split.train_x.split(325), split.train_y.split(325), strict=True))
    test = (split.test_x[: args.queries], split.test_y[: args.queries])
    masks, outputs = data["masks"], data["outputs"][:, : args.queries]

    def score(query, train, pre) -> float:
        scores = lf.influence(query, train, preconditioner=pre)
        return float(lf.lds(scores, masks, outputs, measurement="loss")[0])

    print(f"{'projection':10s} {'preconditioner':22s} " + " ".join(f"{d:>8s}" for d in DAMPINGS))
    for rank in args.ranks:
        spec = lf.logra(model, rank=None if rank == "full" else int(rank))
        train = lf.projected_grads(model, params, (split.train_x, split.train_y), spec)
        query = lf.projected_grads(model, params, test, spec)
        label = "full" if rank == "full" else f"LoGra {rank}"
        print(f"{label:10s} {'identity':22s} {score(query, train, None):8.3f}")
        for method, fisher in CURVATURES:
            factors = fit_curvature(
                model, params, loader, spec, method=method, fisher=fisher, progress=False
            )
            row = [score(query, train, lf.preconditioner(factors, d)) for d in DAMPINGS.values()]
            name = f"{method} ({fisher})"
            print(f"{label:10s} {name:22s} " + " ".join(f"{v:8.3f}" for v in row), flush=True)
    print(f"{args.queries} test points, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
