"""Influence through the library pipeline against leave-one-out retraining on digits.

The stored ground truth (``tests/data/loo_logreg.npz``) holds the trained logistic regression of
``logix_func.digits`` (objective: mean cross-entropy + (l2 / 2)·‖θ‖², bias included) and, for 100
removed training rows and 50 test rows, ``delta_loss[q, m]`` = test loss q after retraining
without row m minus before. The objective's Hessian is the mean-loss curvature plus ``l2·I``, so
influence with the exact curvature and damping ``l2`` is the Newton step of the removal:
``score / N`` predicts ``delta_loss`` (positive score: the removal raises the query loss).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import logix_func as lf
from logix_func import digits

DATA = Path(__file__).parent / "data" / "loo_logreg.npz"


@pytest.fixture(scope="module")
def loo():
    stored = np.load(DATA)
    split = digits.digits_split()
    assert int(stored["n_train"]) == len(split.train_y)
    model = digits.logreg_model()
    params = {k: torch.from_numpy(stored[k]) for k in ("weight", "bias")}
    removed, test = torch.from_numpy(stored["removed"]), torch.from_numpy(stored["test"])
    spec = lf.logra(model, rank=None)
    train_rows = (split.train_x[removed], split.train_y[removed])
    return {
        "model": model,
        "params": params,
        "l2": float(stored["l2"]),
        "spec": spec,
        "batch": (split.train_x, split.train_y),
        "train": lf.projected_grads(model, params, train_rows, spec),
        "query": lf.projected_grads(model, params, (split.test_x[test], split.test_y[test]), spec),
        "actual": stored["delta_loss"],
    }


def pearson_with_loo(loo, factors) -> float:
    pre = lf.preconditioner(factors, damping=loo["l2"]) if factors else None
    scores = lf.influence(loo["query"], loo["train"], preconditioner=pre).double().numpy()
    predicted = scores / len(loo["batch"][1])
    return float(np.corrcoef(predicted.ravel(), loo["actual"].ravel())[0, 1])


def test_stored_parameters_minimise_the_stated_objective(loo):
    params = {k: v.clone().requires_grad_(True) for k, v in loo["params"].items()}
    objective = digits.logreg_objective(params, *loo["batch"], loo["l2"])
    grads = torch.autograd.grad(objective, list(params.values()))
    assert max(g.abs().max().item() for g in grads) < 1e-8


def test_exact_curvature_influence_predicts_leave_one_out(loo):
    factors = lf.exact_curvature(
        loo["model"], loo["params"], loo["batch"], loo["spec"], kind="hessian"
    )
    exact = pearson_with_loo(loo, factors)
    print(f"exact Hessian: Pearson {exact:.4f}")
    assert exact >= 0.95


def kfac_and_ekfac(loo, fisher: str):
    model, params, batch, spec = loo["model"], loo["params"], loo["batch"], loo["spec"]
    grads, logs = lf.fisher_logs(model, params, batch, spec, fisher=fisher)
    kfac = lf.kfac(fisher, dtype=torch.float64)
    kfac_factors = kfac.finalize(kfac.update(kfac.init(spec), logs))
    ekfac = lf.ekfac(kfac_factors)
    return kfac_factors, ekfac.finalize(ekfac.update(ekfac.init(), grads))


def test_approximate_curvatures_rank_between_identity_and_exact(loo):
    exact = pearson_with_loo(
        loo, lf.exact_curvature(loo["model"], loo["params"], loo["batch"], loo["spec"])
    )
    figures = {"identity": pearson_with_loo(loo, None)}
    for fisher in ("true", "exact"):
        kfac_factors, ekfac_factors = kfac_and_ekfac(loo, fisher)
        figures[f"KFAC ({fisher} Fisher)"] = pearson_with_loo(loo, kfac_factors)
        figures[f"EKFAC ({fisher} Fisher)"] = pearson_with_loo(loo, ekfac_factors)
    print(f"exact GGN: Pearson {exact:.4f}")
    for name, value in figures.items():
        print(f"{name}: Pearson {value:.4f}")
    identity = figures.pop("identity")
    assert all(identity < value < exact for value in figures.values())
