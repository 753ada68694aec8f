"""Leave-one-out ground truth for the digits logistic regression.

Trains the reference logistic regression (`logix_func.demo.digits`) on the full training split,
then, for each of 100 training examples (the 40 with the highest training loss and 60 drawn at
random from the rest), retrains without it, warm-started and converged to max |grad| <= 1e-12,
and records the change of 50 test losses (10 highest-loss test points, 40 random):

    delta_loss[q, m] = loss_q(θ without removed[m]) - loss_q(θ)

Removal sets the example's weight to zero in ``(1/N) Σ_j ℓ_j + (l2/2) ||θ||²`` (N = full
training size), i.e. retrains on the N - 1 others with ``l2 * N / (N - 1)``.
``delta_loss_mean`` uses the plain mean over N - 1 with the same ``l2`` instead; it differs from
the first by roughly the same amount for every removed example of a test point.

The script also checks the exact influence prediction ``g_qᵀ H⁻¹ g_i / N`` (dense float64
Hessian of the objective) against both and prints the Pearson correlations.

    python -m benchmarks.ground_truth.loo_logreg [--out tests/data/loo_logreg.npz]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import stats
from torch.func import functional_call, grad, vmap

from logix_func.demo import digits

N_HIGH_LOSS, N_RANDOM, N_TEST_HIGH, N_TEST_RANDOM = 40, 60, 10, 40
SEED = 0


def pick(losses: torch.Tensor, n_high: int, n_random: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``n_high`` largest losses, then ``n_random`` drawn from the rest, sorted."""
    high = torch.argsort(losses, descending=True)[:n_high].numpy()
    rest = np.setdiff1d(np.arange(len(losses)), high)
    return np.sort(np.concatenate([high, rng.choice(rest, n_random, replace=False)]))


def loo_deltas(
    split: digits.DigitsSplit,
    params: dict,
    l2: float,
    removed: np.ndarray,
    test: np.ndarray,
    *,
    mean_over_rest: bool = False,
) -> np.ndarray:
    """``[Q, M]``: test loss q after retraining without ``removed[m]`` minus before.

    Removal zeroes the example's weight in the mean over N (``l2 * N / (N - 1)`` on the mean
    over the rest), or with ``mean_over_rest`` keeps ``l2`` on the mean over the N - 1 others.
    """
    n = len(split.train_y)
    model = digits.logreg_model(inputs=split.train_x.shape[1], bias="bias" in params)
    test_x, test_y = split.test_x[test], split.test_y[test]
    before = digits.per_example_loss(model, params, test_x, test_y)
    reg = l2 if mean_over_rest else l2 * n / (n - 1)
    delta = np.zeros((len(test), len(removed)))
    for m, i in enumerate(removed):
        keep = torch.arange(n) != int(i)
        loo = digits.train_logreg(split.train_x[keep], split.train_y[keep], reg, init=params)
        delta[:, m] = (digits.per_example_loss(model, loo, test_x, test_y) - before).numpy()
    return delta


def exact_influence(params, split, removed, test, l2) -> np.ndarray:
    """``g_qᵀ H⁻¹ g_i`` for each test q and removed i: ``[Q, M]``, float64."""
    model = digits.logreg_model(inputs=split.train_x.shape[1], bias="bias" in params)
    names = list(params)
    flat = torch.cat([params[k].flatten() for k in names])
    sizes = [params[k].numel() for k in names]

    def unflat(theta):
        chunks = theta.split(sizes)
        return {k: c.view(params[k].shape) for k, c in zip(names, chunks, strict=True)}

    def objective(theta):
        return digits.logreg_objective(unflat(theta), split.train_x, split.train_y, l2)

    def example_loss(theta, x, y):
        logits = functional_call(model, unflat(theta), (x[None],))
        return torch.nn.functional.cross_entropy(logits, y[None])

    hess = torch.autograd.functional.hessian(objective, flat)
    g_train = vmap(grad(example_loss), in_dims=(None, 0, 0))(
        flat, split.train_x[removed], split.train_y[removed]
    )
    g_test = vmap(grad(example_loss), in_dims=(None, 0, 0))(
        flat, split.test_x[test], split.test_y[test]
    )
    return (g_test @ torch.linalg.solve(hess, g_train.T)).numpy()


def generate(
    split: digits.DigitsSplit,
    l2: float,
    out_path: str,
    *,
    counts: tuple[int, int, int, int] = (N_HIGH_LOSS, N_RANDOM, N_TEST_HIGH, N_TEST_RANDOM),
    seed: int = SEED,
    split_seed: int = digits.SPLIT_SEED,
) -> None:
    """Train on ``split``, retrain without each picked example, save and print the check.

    ``counts``: removed (highest-loss, random), test points (highest-loss, random). The model
    has a bias unless the inputs already carry a constant column (``with_constant``), as for
    `digits.train_logreg`: here, a bias exactly when the inputs have 64 columns.
    """
    start = time.perf_counter()
    n, bias = len(split.train_y), split.train_x.shape[1] == 64
    model = digits.logreg_model(inputs=split.train_x.shape[1], bias=bias)
    params = digits.train_logreg(split.train_x, split.train_y, l2, bias=bias)
    rng = np.random.default_rng(seed)
    train_loss = digits.per_example_loss(model, params, split.train_x, split.train_y)
    test_loss_all = digits.per_example_loss(model, params, split.test_x, split.test_y)
    removed = pick(train_loss, counts[0], counts[1], rng)
    test = pick(test_loss_all, counts[2], counts[3], rng)
    test_loss = test_loss_all[test]

    delta = loo_deltas(split, params, l2, removed, test)
    delta_mean = loo_deltas(split, params, l2, removed, test, mean_over_rest=True)

    predicted = exact_influence(params, split, removed, test, l2) / n
    np.savez_compressed(
        out_path,
        l2=l2,
        n_train=n,
        split_seed=split_seed,
        removed=removed,
        test=test,
        test_loss=test_loss.numpy(),
        delta_loss=delta,
        delta_loss_mean=delta_mean,
        **{k: v.numpy() for k, v in params.items()},
    )
    acc = (functional_call(model, params, (split.test_x,)).argmax(1) == split.test_y).double()
    print(f"logreg l2={l2:.4g}: train loss {train_loss.mean():.4f}, test accuracy {acc.mean():.4f}")
    print(f"{len(removed)} removed x {len(test)} test points, saved to {out_path}")
    for name, actual in [("delta_loss", delta), ("delta_loss_mean", delta_mean)]:
        r = stats.pearsonr(predicted.ravel(), actual.ravel())[0]
        rho = stats.spearmanr(predicted.ravel(), actual.ravel())[0]
        per_q = np.mean([stats.pearsonr(p, a)[0] for p, a in zip(predicted, actual, strict=True)])
        print(
            f"exact influence / N vs {name}: Pearson {r:.4f}, Spearman {rho:.4f}, "
            f"mean per-test Pearson {per_q:.4f}"
        )
    print(f"time {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/loo_logreg.npz")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: a second thread only adds contention
    generate(digits.digits_split(), digits.LOGREG_L2, args.out)


if __name__ == "__main__":
    main()
