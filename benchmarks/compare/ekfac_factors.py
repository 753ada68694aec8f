"""Our EKFAC against Kronfluence's, factor by factor, on the constant-column logistic regression.

Run with the peers' python and this checkout first on the path:

    PYTHONPATH=. .venv-peers/bin/python -m benchmarks.compare.ekfac_factors [--seeds 5]

The problem is `benchmarks.ground_truth.loo_logreg_constant` (65 inputs incl. a constant, no
bias, l2 = 1/N on the mean loss) with its stored leave-one-out ground truth
(tests/data/loo_logreg_constant.npz). Both tools get the same float32 weights, data and batches
of 325. Kronfluence runs its documented workflow (summed cross-entropy with labels sampled from
the model, ``fit_all_factors("ekfac")``, ``compute_pairwise_scores``); its factors are then
read back and compared with ours entry by entry, and fed to our preconditioner to check that
everything downstream of the factors (damping, gradient and loss scaling) agrees.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from torch.utils.data import TensorDataset

import logix_func as lf
from benchmarks.compare.kronfluence_ekfac import Classification, ekfac_scores
from benchmarks.ground_truth.loo_logreg_constant import constant_split
from logix_func.demo import digits
from logix_func.pipeline import fit_curvature

DATA = Path(__file__).parents[2] / "tests" / "data" / "loo_logreg_constant.npz"
BATCH = 325


def kronfluence_ekfac(model, train, query, workdir, damping, seed):
    """Kronfluence's normalised factors (our names, float64) and its scores ``[Q, N]``."""
    torch.manual_seed(seed)  # Kronfluence draws its labels from the global generator
    task = Classification()
    # Kronfluence replaces a parent's modules in place: give it a copy inside a container
    wrapped = prepare_model(torch.nn.Sequential(copy.deepcopy(model)), task)
    analyzer = Analyzer("ekfac", wrapped, task, cpu=True, disable_tqdm=True, output_dir=workdir)
    scores = ekfac_scores(
        analyzer, TensorDataset(*train), TensorDataset(*query), BATCH, damping=damping
    ).double()
    raw = {
        **analyzer.load_covariance_matrices("ekfac"),
        **analyzer.load_eigendecomposition("ekfac"),
        **analyzer.load_lambda_matrices("ekfac"),
    }

    def one(key):
        return next(iter(raw[key].values())).double()

    layer = {
        "A": one("activation_covariance") / one("num_activation_covariance_processed"),
        "S": one("gradient_covariance") / one("num_gradient_covariance_processed"),
        "QA": one("activation_eigenvectors"),
        "QS": one("gradient_eigenvectors"),
        "eigenvalues": one("lambda_matrix") / one("num_lambda_processed"),
    }
    return layer, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="label-sampling seeds per tool")
    parser.add_argument("--workdir", default="/tmp/ekfac_factors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stored = np.load(DATA)
    split, l2 = constant_split(), float(stored["l2"])
    n, actual = len(split.train_y), stored["delta_loss"]
    removed, test = torch.from_numpy(stored["removed"]), torch.from_numpy(stored["test"])
    model = digits.logreg_model(torch.float32, inputs=65, bias=False)
    params = {"weight": torch.from_numpy(stored["weight"]).float()}
    model.load_state_dict(params)
    x, y = split.train_x.float(), split.train_y
    spec = lf.logra(model, rank=None)
    train_rows = lf.projected_grads(model, params, (x[removed], y[removed]), spec)
    query_batch = (split.test_x[test].float(), split.test_y[test])
    query = lf.projected_grads(model, params, query_batch, spec)
    loader = list(zip(x.split(BATCH), y.split(BATCH), strict=True))

    def pearson(scores) -> float:
        return float(np.corrcoef(np.asarray(scores).ravel() / n, actual.ravel())[0, 1])

    def ours_scores(factors, damping=l2):
        pre = lf.preconditioner(factors, damping=damping)
        return lf.influence(query, train_rows, preconditioner=pre).double().numpy()

    exact = lf.exact_curvature(model, params, (x, y), spec, kind="hessian")
    print(
        f"N = {n}, l2 = {l2:.4g}; exact Hessian + l2: LOO Pearson {pearson(ours_scores(exact)):.4f}"
    )
    rows: dict[str, list[float]] = {}
    ours, theirs = [], []
    for seed in range(args.seeds):
        f = fit_curvature(
            model, params, loader, spec, method="ekfac", fisher="true", seed=seed, progress=False
        )
        ours.append(f)
        rows.setdefault("ours EKFAC, true Fisher, damping l2", []).append(pearson(ours_scores(f)))
        rows.setdefault("ours EKFAC, true Fisher, default damping", []).append(
            pearson(ours_scores(f, None))
        )
        layer, scores = kronfluence_ekfac(
            model, (x, y), query_batch, f"{args.workdir}/s{seed}", l2, seed
        )
        theirs.append(layer)
        rows.setdefault("Kronfluence EKFAC, true Fisher, damping l2", []).append(
            pearson(scores[:, removed])
        )
        hybrid = {"spec": f["spec"], "layers": {"": layer}}
        rows.setdefault("our pipeline on Kronfluence's factors, damping l2", []).append(
            pearson(ours_scores(hybrid))
        )
        kf = scores[:, removed].numpy()
        same = np.abs(ours_scores(hybrid) - kf).max() / np.abs(kf).max()
        rows.setdefault("  max |ours - Kronfluence's| / max |Kronfluence's|", []).append(same)
    for fisher in ("exact", "empirical"):
        f = fit_curvature(
            model, params, loader, spec, method="ekfac", fisher=fisher, progress=False
        )
        rows[f"ours EKFAC, {fisher} Fisher, damping l2"] = [pearson(ours_scores(f))]
        rows[f"ours EKFAC, {fisher} Fisher, default damping"] = [pearson(ours_scores(f, None))]
    f = fit_curvature(model, params, loader, spec, progress=False)
    rows["ours default (auto = GGN, fisher='auto' = exact here, default damping)"] = [
        pearson(ours_scores(f, None))
    ]
    print(f"\nLOO Pearson, {len(removed)} removed x {len(test)} test points (mean ± sd over seeds)")
    for name, values in rows.items():
        print(f"  {name:62s} {np.mean(values):.4g} ± {np.std(values):.2g}  (n={len(values)})")

    ref = fit_curvature(model, params, loader, spec, method="ekfac", fisher="exact", progress=False)
    ref = ref["layers"][""]

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    print("\nfactor by factor, relative Frobenius distance (mean over seeds)")
    heads = ("ours vs Kronfluence", "ours vs exact", "Kronf. vs exact")
    print(f"  {'factor':28s} {heads[0]:>20s} {heads[1]:>14s} {heads[2]:>16s}")
    for key in ("A", "S", "eigenvalues"):
        pairs = [
            np.mean([rel(o["layers"][""][key], t[key]) for o, t in zip(ours, theirs, strict=True)]),
            np.mean([rel(o["layers"][""][key], ref[key]) for o in ours]),
            np.mean([rel(t[key], ref[key]) for t in theirs]),
        ]
        print(f"  {key:28s} {pairs[0]:20.3g} {pairs[1]:14.3g} {pairs[2]:16.3g}")
    print("  (eigenvalues: Λ = E[(Q_Sᵀ G Q_A)²], each tool in its own eigenbasis)")
    mean_ours = np.mean([float(o["layers"][""]["eigenvalues"].mean()) for o in ours])
    mean_theirs = np.mean([float(t["eigenvalues"].mean()) for t in theirs])
    print(
        f"  mean eigenvalue: ours {mean_ours:.4g}, Kronfluence {mean_theirs:.4g}; "
        f"default damping 0.1 × that in both"
    )


if __name__ == "__main__":
    main()
