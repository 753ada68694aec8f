"""Accuracy of influence with each curvature, through the library pipeline, on digits.

* Logistic regression, leave-one-out (``tests/data/loo_logreg.npz``): Pearson correlation of
  ``score / N`` with the retrained change of the test loss (100 removed × 50 test rows).
* MLP, LDS (``tests/data/lds_mlp.npz``): linear datamodeling score over the 497 test rows.

Curvatures: per-layer exact GGN and Hessian (``exact_curvature``), KFAC and EKFAC with the true
(one sampled label per row) and exact Fisher, and the identity. Damping is the training
objective's L2 coefficient, plus ``--extra`` for the MLP.

    python -m benchmarks.curvature_accuracy [--extra 0 1e-3 1e-2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import logix_func as lf
from logix_func.demo import digits

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def curvatures(model, params, batch, spec) -> dict[str, Any]:
    """``{name: factors}`` for every curvature, timed."""
    out: dict[str, Any] = {}
    for kind in ("ggn", "hessian"):
        start = time.perf_counter()
        out[f"exact {kind}"] = lf.exact_curvature(model, params, batch, spec, kind=kind)
        print(f"  exact {kind}: {time.perf_counter() - start:.1f} s")
    for fisher in ("true", "exact"):
        grads, logs = lf.fisher_logs(model, params, batch, spec, fisher=fisher)
        kfac = lf.kfac(fisher, dtype=torch.float64)
        out[f"KFAC ({fisher} Fisher)"] = kfac.finalize(kfac.update(kfac.init(spec), logs))
        ekfac = lf.ekfac(out[f"KFAC ({fisher} Fisher)"])
        out[f"EKFAC ({fisher} Fisher)"] = ekfac.finalize(ekfac.update(ekfac.init(), grads))
    out["identity"] = None
    return out


def scores(query, train, factors, damping: float) -> torch.Tensor:
    if factors is None:
        return lf.influence(query, train).double()
    try:
        pre = lf.preconditioner(factors, damping=damping)
    except ValueError:  # an indefinite Hessian needs more damping
        return torch.full((len(next(iter(query.values()))), 1), torch.nan)
    return lf.influence(query, train, preconditioner=pre).double()


def loo() -> None:
    stored = np.load(DATA / "loo_logreg.npz")
    split, model = digits.digits_split(), digits.logreg_model()
    params = {k: torch.from_numpy(stored[k]) for k in ("weight", "bias")}
    removed, test = stored["removed"], stored["test"]
    spec = lf.logra(model, rank=None)
    train = lf.projected_grads(
        model, params, (split.train_x[removed], split.train_y[removed]), spec
    )
    query = lf.projected_grads(model, params, (split.test_x[test], split.test_y[test]), spec)
    print(f"logistic regression, leave-one-out, damping = l2 = {float(stored['l2'])}")
    for name, factors in curvatures(model, params, (split.train_x, split.train_y), spec).items():
        predicted = scores(query, train, factors, float(stored["l2"])) / len(split.train_y)
        r, _ = lf.loo_correlation(predicted, stored["delta_loss"])
        print(f"  {name:24s} Pearson {r:.4f}")


def lds(extras: list[float]) -> None:
    stored = dict(np.load(DATA / "lds_mlp.npz"))
    split, model = digits.digits_split(), digits.mlp_model()
    params = {k.removeprefix("param/"): torch.from_numpy(v) for k, v in stored.items() if "/" in k}
    spec = lf.logra(model, rank=None)
    batch = (split.train_x, split.train_y)
    train = lf.projected_grads(model, params, batch, spec)
    query = lf.projected_grads(model, params, (split.test_x, split.test_y), spec)
    decay = float(stored["weight_decay"])
    print(f"MLP, LDS over {len(split.test_y)} test rows, damping = weight decay {decay} + extra")
    fitted = curvatures(model, params, batch, spec)
    print("  " + " " * 24 + "".join(f"  +{e:<7g}" for e in extras))
    for name, factors in fitted.items():
        row = []
        for extra in extras:
            s = scores(query, train, factors, decay + extra)
            value = (
                float("nan")
                if s.isnan().any()
                else lf.lds(s, stored["masks"], stored["outputs"])[0]
            )
            row.append(value)
        print(f"  {name:24s}" + "".join(f"  {v:8.3f}" for v in row))
    print("  (nan: the damping does not make C + λI positive definite)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", type=float, nargs="+", default=[0.0, 1e-3, 1e-2])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    loo()
    lds(args.extra)


if __name__ == "__main__":
    main()
