"""A second, larger LDS ground truth: a deeper digits MLP on another split, many more retrainings.

Model: ``64 → 128 → tanh → 128 → tanh → 10`` (`digits.mlp_model(128, depth=2)`), the same
objective and full-batch Adam schedule as the reference MLP (`digits.train_mlps`), trained in
float32 on `digits.digits_split(seed=SPLIT_SEED)`, a permutation other than the tests' reference
split. Ground truth: 256 random half subsets (α = 0.5), each retrained with the five seeds
0..4; for every one of the 497 test points, its cross-entropy loss (the LDS measurement,
``lds(..., measurement="loss")``) and TRAK's margin, per seed:

    loss_per_seed[s, k, q], margin_per_seed[s, k, q]      s < 256 subsets, k < 5 seeds

Also stored: the five models trained on the full training set (seeds 0..4, ``param{k}/...``);
attribution is computed on seed 0's, the others serve ensembles.

Noise ceiling. Split the seeds into halves A = {0, 1} and B = {2, 3, 4}, average each half,
and take the Spearman correlation over subsets of the two halves' outputs, per test point;
``r_half`` is its mean over the 10 ways to split five seeds 2 + 3. The Spearman-Brown
correction ``reliability = 2 r_half / (1 + r_half)`` estimates the correlation between two
independent five-seed ground truths; ``sqrt(reliability)`` bounds the LDS any attribution can
reach against this one (its correlation with the noise-free expected outputs).

    python -m benchmarks.ground_truth.lds_deep_mlp [--out tests/data/lds_deep_mlp.npz]

The retrainings run in parts of `PART` subsets, each saved next to ``--out`` as it finishes
(``OUT.partSTART.npz``) and skipped when present, so a run resumes where it stopped; with
``--worker K --workers W`` a process does only parts ``K, K + W, …`` and exits, so two
processes can share the work before a plain run assembles the file.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import grad, vmap

from benchmarks.ground_truth.lds_mlp import retrain_outputs, subset_masks
from logix_func.demo import digits
from logix_func.metrics import lds, spearman

SPLIT_SEED, SUBSET_SEED = 7, 7
N_SUBSETS, SEEDS, CHUNK, PART = 256, (0, 1, 2, 3, 4), 8, 16
MLP = {"width": 128, "depth": 2}


def split_half_reliability(per_seed: np.ndarray) -> tuple[float, float]:
    """``(r_half, reliability)`` of ``per_seed [S, K, Q]`` outputs, see the module docstring."""
    k = per_seed.shape[1]
    r = []
    for half in itertools.combinations(range(k), k // 2):
        rest = [s for s in range(k) if s not in half]
        a, b = per_seed[:, list(half)].mean(axis=1), per_seed[:, rest].mean(axis=1)
        r.append(float(spearman(a.T, b.T).nanmean()))
    r_half = float(np.mean(r))
    return r_half, 2 * r_half / (1 + r_half)


def retrain_parts(split, masks, out: str, worker: int = 0, workers: int = 1) -> None:
    """Retrain the subsets of every missing part ``i`` with ``i % workers == worker``."""
    for i, start in enumerate(range(0, len(masks), PART)):
        path = Path(f"{out}.part{start}.npz")
        if i % workers != worker or path.exists():
            continue
        losses, margins = retrain_outputs(
            split,
            masks[start : start + PART],
            SEEDS,
            CHUNK,
            (digits.per_example_loss, digits.per_example_margin),
            **MLP,
        )
        np.savez(path, loss=losses.astype(np.float32), margin=margins.astype(np.float32))
        print(f"part {start}: subsets {start}..{start + len(losses) - 1} saved", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/lds_deep_mlp.npz")
    parser.add_argument("--subsets", type=int, default=N_SUBSETS)
    parser.add_argument("--worker", type=int, default=None, help="do only this worker's parts")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: a second thread only adds contention
    start = time.perf_counter()

    split = digits.digits_split(torch.float32, seed=SPLIT_SEED)
    masks = subset_masks(len(split.train_y), args.subsets, seed=SUBSET_SEED)
    if args.worker is not None:
        retrain_parts(split, masks, args.out, args.worker, args.workers)
        return
    model = digits.mlp_model(**MLP)
    full = digits.train_mlps(split.train_x, split.train_y, list(SEEDS), **MLP)
    for k in range(len(SEEDS)):
        params = {name: v[k] for name, v in full.items()}
        loss = digits.per_example_loss(model, params, split.test_x, split.test_y)
        margin = digits.per_example_margin(model, params, split.test_x, split.test_y)
        accuracy = (margin > 0).float().mean()
        print(f"full MLP seed {k}: test loss {loss.mean():.4f}, accuracy {accuracy:.4f}")

    retrain_parts(split, masks, args.out)
    parts = [np.load(f"{args.out}.part{s}.npz") for s in range(0, len(masks), PART)]
    losses = np.concatenate([p["loss"] for p in parts])
    margins = np.concatenate([p["margin"] for p in parts])
    elapsed = time.perf_counter() - start
    np.savez_compressed(
        args.out,
        split_seed=SPLIT_SEED,
        masks=masks,
        seeds=np.array(SEEDS),
        loss_per_seed=losses.astype(np.float32),
        margin_per_seed=margins.astype(np.float32),
        width=MLP["width"],
        depth=MLP["depth"],
        weight_decay=digits.MLP_WEIGHT_DECAY,
        steps=digits.MLP_STEPS,
        lr=digits.MLP_LR,
        **{f"param{k}/{name}": v[k].numpy() for k in range(len(SEEDS)) for name, v in full.items()},
    )
    print(f"{len(masks)} subsets x {len(SEEDS)} seeds, {losses.shape[2]} test points: {args.out}")
    print(f"generation time {elapsed:.0f} s")

    for name, per_seed in [("loss", losses), ("margin", margins)]:
        r_half, reliability = split_half_reliability(per_seed)
        print(
            f"{name}: split-half Spearman {r_half:.3f}, reliability (Spearman-Brown) "
            f"{reliability:.3f}, LDS ceiling sqrt {np.sqrt(reliability):.3f}"
        )

    # A sanity figure: LDS of gradient dot products on the seed-0 model (float64).
    params = {name: v[0].double() for name, v in full.items()}
    split64 = digits.digits_split(seed=SPLIT_SEED)

    def example_loss(p, x, y):
        return digits.mlp_objective(model, p, x[None], y[None], weight_decay=0.0)

    def flat(x, y):
        g = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([v.flatten(1) for v in g.values()], dim=1)

    scores = flat(split64.test_x, split64.test_y) @ flat(split64.train_x, split64.train_y).T
    mean, _ = lds(scores, masks, losses.mean(axis=1), measurement="loss")
    print(f"LDS gradient dot product {mean:.4f}; total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
