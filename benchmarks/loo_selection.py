"""How much a 100 × 20 leave-one-out Pearson depends on which 20 test points are drawn.

On the constant-column logistic regression of `benchmarks.ground_truth.loo_logreg_constant`,
retrains without each of 100 random training examples (a draw other than the stored one) and
records the change of *every* test loss (497). Then, for the exact Hessian, our default
(``method="auto"``: the dense GGN of the one layer here), EKFAC and EKFAC with one sampled
label per example (seeds 0..4, the true Fisher that
Kronfluence also uses), it prints the Pearson correlation over all 100 × 497 pairs and its
spread over 200 random draws of 20 test points (median, 5th and 95th percentile).

    python -m benchmarks.loo_selection
"""

from __future__ import annotations

import time

import numpy as np
import torch

import logix_func as lf
from benchmarks.ground_truth.loo_logreg import loo_deltas
from benchmarks.ground_truth.loo_logreg_constant import ALPHA, constant_split
from logix_func.demo import digits
from logix_func.pipeline import fit_curvature

REMOVED_SEED, DRAWS, DRAW_SIZE = 5, 200, 20


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    split = constant_split()
    n = len(split.train_y)
    l2 = ALPHA / n
    model = digits.logreg_model(inputs=65, bias=False)
    params = digits.train_logreg(split.train_x, split.train_y, l2, bias=False)
    removed = np.sort(np.random.default_rng(REMOVED_SEED).choice(n, 100, replace=False))
    test = np.arange(len(split.test_y))
    actual = loo_deltas(split, params, l2, removed, test)
    print(f"retrained 100 removals in {time.perf_counter() - start:.0f} s")

    spec = lf.logra(model, rank=None)
    train = lf.projected_grads(
        model, params, (split.train_x[removed], split.train_y[removed]), spec
    )
    query = lf.projected_grads(model, params, (split.test_x, split.test_y), spec)
    loader = list(zip(split.train_x.split(325), split.train_y.split(325), strict=True))
    hessian = lf.exact_curvature(
        model, params, (split.train_x, split.train_y), spec, kind="hessian"
    )
    methods = {"exact Hessian, damping l2": (hessian, l2)}
    methods["default (auto = GGN, fisher='auto' = exact here)"] = (
        fit_curvature(model, params, loader, spec, progress=False),
        None,
    )
    methods["EKFAC, fisher='auto' = exact"] = (
        fit_curvature(model, params, loader, spec, method="ekfac", progress=False),
        None,
    )
    for seed in range(5):
        factors = fit_curvature(
            model, params, loader, spec, method="ekfac", fisher="true", seed=seed, progress=False
        )
        methods[f"EKFAC, one sampled label, seed {seed}"] = (factors, None)
    draws = np.random.default_rng(0)
    picks = [draws.choice(len(test), DRAW_SIZE, replace=False) for _ in range(DRAWS)]
    print(f"{'':48s} all 497   20 test points: median [5%, 95%]")
    for name, (factors, damping) in methods.items():
        pre = lf.preconditioner(factors, damping=damping)
        predicted = lf.influence(query, train, preconditioner=pre).double().numpy() / n
        full = lf.loo_correlation(predicted, actual)[0]
        r = [lf.loo_correlation(predicted[p], actual[p])[0] for p in picks]
        lo, mid, hi = np.percentile(r, [5, 50, 95])
        print(f"{name:48s} {full:.3f}     {mid:.3f} [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
