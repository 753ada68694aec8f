"""Linear datamodeling score (LDS) ground truth for the digits MLP.

Trains the reference MLP (`logix_func.demo.digits.train_mlp`, seed 0) on the full training split:
the model that attribution is computed on. Then draws 100 random half subsets (α = 0.5, exactly
N/2 examples each), retrains the MLP on each with seeds 0, 1, 2 (the same three
initialisations for every subset) and records each test example's cross-entropy loss,
averaged over the seeds: ``outputs[s, q]`` for all 497 test examples. A loss falls when
training data helps, so use ``lds(..., measurement="loss")``.

It then prints the LDS of a few reference attributions computed on the full model: gradient
dot products and exact influence with the dense Gauss-Newton (GGN) and Hessian matrices of
the training objective, with extra damping.

    python -m benchmarks.ground_truth.lds_mlp [--out tests/data/lds_mlp.npz]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from logix_func.demo import digits
from logix_func.metrics import lds, spearman

N_SUBSETS, SEEDS, ALPHA, SUBSET_SEED, CHUNK = 100, (0, 1, 2), 0.5, 0, 20


def subset_masks(
    n: int, count: int = N_SUBSETS, alpha: float = ALPHA, seed: int = SUBSET_SEED
) -> np.ndarray:
    """``[count, n]`` boolean masks, each with exactly ``round(alpha * n)`` entries set."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, n), dtype=bool)
    for row in masks:
        row[rng.permutation(n)[: round(alpha * n)]] = True
    return masks


def retrain_outputs(
    split: digits.DigitsSplit,
    masks: np.ndarray,
    seeds: tuple[int, ...] = SEEDS,
    chunk: int = CHUNK,
    measures: tuple = (digits.per_example_loss,),
    **mlp,
) -> list[np.ndarray]:
    """Per measure, ``[S, len(seeds), Q]``: each test output of the MLPs retrained on each subset
    with each seed. A measure is ``fn(model, params, x, y) -> [Q]``; ``mlp`` goes to
    `digits.train_mlps` (width, depth, ...)."""
    model = digits.mlp_model(mlp.get("width", digits.MLP_WIDTH), depth=mlp.get("depth", 1))
    outs = [np.zeros((len(masks), len(seeds), len(split.test_y))) for _ in measures]
    for start in range(0, len(masks), chunk):
        block = torch.from_numpy(masks[start : start + chunk])
        run_seeds = [s for _ in range(len(block)) for s in seeds]
        stacked = digits.train_mlps(
            split.train_x,
            split.train_y,
            run_seeds,
            block.repeat_interleave(len(seeds), dim=0),
            **mlp,
        )
        for m in range(len(run_seeds)):
            params = {k: v[m] for k, v in stacked.items()}
            for out, measure in zip(outs, measures, strict=True):
                value = measure(model, params, split.test_x, split.test_y)
                out[start + m // len(seeds), m % len(seeds)] = value.numpy()
        print(f"  retrained {start + len(block)}/{len(masks)} subsets", flush=True)
    return outs


def reference_scores(split: digits.DigitsSplit, params: dict) -> dict[str, torch.Tensor]:
    """``{name: [Q, N]}`` scores of reference attributions on the full model (float64)."""
    model = digits.mlp_model()
    names = list(params)
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].flatten() for k in names])

    def unflat(theta):
        return {k: c.view(params[k].shape) for k, c in zip(names, theta.split(sizes), strict=True)}

    def logits(theta, x):
        return functional_call(model, unflat(theta), (x[None],))[0]

    def example_loss(theta, x, y):
        return torch.nn.functional.cross_entropy(logits(theta, x)[None], y[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    g_train = per_example(flat, split.train_x, split.train_y)
    g_test = per_example(flat, split.test_x, split.test_y)
    n = len(split.train_y)
    # GGN of the mean cross-entropy: (1/n) Σ_n Σ_c p_nc g_nc g_ncᵀ, g_nc the gradient at label c
    prob = torch.softmax(functional_call(model, params, (split.train_x,)), dim=1).detach()
    ggn = torch.zeros(len(flat), len(flat), dtype=flat.dtype)
    for c in range(prob.shape[1]):
        g_c = per_example(flat, split.train_x, torch.full_like(split.train_y, c))
        ggn += (g_c * prob[:, c : c + 1]).T @ g_c / n
    eye = torch.eye(len(flat), dtype=flat.dtype)
    ggn += digits.MLP_WEIGHT_DECAY * eye

    def objective(theta):
        return digits.mlp_objective(model, unflat(theta), split.train_x, split.train_y)

    hess = torch.autograd.functional.hessian(objective, flat)
    print(f"  Hessian eigenvalues: min {torch.linalg.eigvalsh(hess)[0]:.3g}", flush=True)
    scores = {"gradient dot product": g_test @ g_train.T}
    for name, curv in [("GGN", ggn), ("Hessian", hess)]:
        for damping in (0.0, 1e-3, 1e-2, 1e-1):
            if name == "Hessian" and damping == 0.0:
                continue  # indefinite at the end of training
            solved = torch.linalg.solve(curv + damping * eye, g_train.T)
            scores[f"{name} influence, damping +{damping:g}"] = g_test @ solved
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/lds_mlp.npz")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: a second thread only adds contention
    start = time.perf_counter()

    split = digits.digits_split()
    model = digits.mlp_model()
    params = digits.train_mlp(split.train_x, split.train_y, seed=0)
    test_loss = digits.per_example_loss(model, params, split.test_x, split.test_y)
    logits = functional_call(model, params, (split.test_x,))
    accuracy = (logits.argmax(1) == split.test_y).double().mean()
    print(f"full MLP: test loss {test_loss.mean():.4f}, test accuracy {accuracy:.4f}")

    masks = subset_masks(len(split.train_y))
    (per_seed,) = retrain_outputs(split, masks)
    outputs = per_seed.mean(axis=1)
    np.savez_compressed(
        args.out,
        masks=masks,
        seeds=np.array(SEEDS),
        outputs=outputs.astype(np.float32),
        outputs_per_seed=per_seed.astype(np.float32),
        test_loss=test_loss.numpy(),
        width=digits.MLP_WIDTH,
        weight_decay=digits.MLP_WEIGHT_DECAY,
        steps=digits.MLP_STEPS,
        lr=digits.MLP_LR,
        **{f"param/{k}": v.numpy() for k, v in params.items()},
    )
    print(f"{len(masks)} subsets x {len(SEEDS)} seeds, {outputs.shape[1]} test points: {args.out}")
    elapsed = time.perf_counter() - start
    print(f"generation time {elapsed:.0f} s")

    # How noisy is the measurement? One seed's subset outputs against another's.
    between = [
        float(spearman(per_seed[:, a].T, per_seed[:, b].T).nanmean())
        for a, b in [(0, 1), (0, 2), (1, 2)]
    ]
    print(f"seed-to-seed Spearman of subset outputs, mean over test points: {np.mean(between):.3f}")
    for name, scores in reference_scores(split, params).items():
        mean, _ = lds(scores, masks, outputs, measurement="loss")
        print(f"LDS {name:36s} {mean:.4f}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
