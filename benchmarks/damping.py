"""LDS against the damping fraction: ``λ = f × mean eigenvalue`` of each layer, per curvature.

    python -m benchmarks.damping [--data tests/data/lds_mlp.npz] [--ranks full 64]
        [--methods ekfac ggn] [--fractions 0.01 0.03 0.1 0.2 0.3 1] [--weight-decay 1e-3]

The default ``lf.preconditioner(factors)`` damps each layer by 0.1 × its mean eigenvalue
(``trace(C) / k`` for a dense block). This prints the LDS (``measurement="loss"``, every test
point) of the seed-0 model of ``--data`` for each fraction ``f``, with the factors fitted once
per curvature and projection (``fit_curvature(method, fisher="exact")``), and for the training
objective's weight decay as an absolute damping. Choose ``f`` on the tuning set
(``tests/data/lds_mlp.npz``), read it on the other (``tests/data/lds_deep_mlp.npz``).
"""

from __future__ import annotations

import argparse
import time

import torch

import logix_func as lf
from benchmarks.lds_data import load_ground_truth
from logix_func.pipeline import fit_curvature


def mean_eigenvalues(factors) -> dict[str, float]:
    """Each layer's mean eigenvalue, as the default damping (0.1 × it) measures it for every
    factor form (KFAC/EKFAC/raw eigenvalues, a dense ``C``, a joint GGN's diagonal block)."""
    return {n: d / 0.1 for n, d in lf.preconditioner(factors).damping.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tests/data/lds_mlp.npz")
    parser.add_argument("--ranks", nargs="+", default=["full", "64"])
    parser.add_argument("--methods", nargs="+", default=["ekfac", "ggn"])
    parser.add_argument(
        "--fractions", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.2, 0.3, 1.0]
    )
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    gt = load_ground_truth(args.data, members=1)
    model, params = gt.model, gt.params[0]
    x, y = gt.split.train_x, gt.split.train_y
    loader = list(zip(x.split(325), y.split(325), strict=True))
    test = (gt.split.test_x, gt.split.test_y)
    print(f"ground truth {args.data}: {gt.describe}")
    header = " ".join(f"{f'f={f:g}':>7s}" for f in args.fractions)
    print(f"{'projection':10s} {'method':6s} {header} {f'wd={args.weight_decay:g}':>8s}")
    for rank in args.ranks:
        spec = lf.logra(model, rank=None if rank == "full" else int(rank))
        train = lf.projected_grads(model, params, (x, y), spec)
        query = lf.projected_grads(model, params, test, spec)
        for method in args.methods:
            factors = fit_curvature(
                model, params, loader, spec, method=method, fisher="exact", progress=False
            )
            means = mean_eigenvalues(factors)
            scales = ", ".join(f"{n}: {m:.2g}" for n, m in means.items())
            dampings = [{n: f * m for n, m in means.items()} for f in args.fractions]
            dampings.append(args.weight_decay)
            values = [
                gt.lds(lf.influence(query, train, preconditioner=lf.preconditioner(factors, d)))
                for d in dampings
            ]
            print(
                f"{rank:10s} {method:6s} "
                + " ".join(f"{v:7.3f}" for v in values[:-1])
                + f" {values[-1]:8.3f}   mean eigenvalues {scales}",
                flush=True,
            )
    print(f"time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
