"""Leave-one-out ground truth for a second digits logistic regression: constant column, no bias.

The recipe of a "sum of losses" user: 65 inputs (the 64 pixels and a constant 1,
`digits.with_constant`), ``nn.Linear(65, 10, bias=False)``, L2 penalty ``α/2 ||W||²`` with
α = 1 on the *summed* cross-entropy, i.e. ``l2 = α / N`` on the mean that `digits` minimises.
Split: `digits.digits_split(seed=SPLIT_SEED)`, another permutation than the reference one.
100 removed training examples × 20 test points, all drawn at random (the reference task picks
high-loss examples, whose large effects any curvature predicts), each removal retrained
exactly (warm-started L-BFGS, then Newton to max |grad| <= 1e-12); the stored fields are
those of `benchmarks.ground_truth.loo_logreg`.

    python -m benchmarks.ground_truth.loo_logreg_constant [--out tests/data/loo_logreg_constant.npz]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.ground_truth.loo_logreg import generate
from logix_func.demo import digits

SPLIT_SEED, ALPHA = 11, 1.0


def constant_split() -> digits.DigitsSplit:
    """`digits.digits_split(seed=SPLIT_SEED)` with a constant column appended to the inputs."""
    s = digits.digits_split(seed=SPLIT_SEED)
    return digits.DigitsSplit(
        digits.with_constant(s.train_x),
        s.train_y,
        digits.with_constant(s.test_x),
        s.test_y,
        s.train_index,
        s.test_index,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/loo_logreg_constant.npz")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: a second thread only adds contention
    split = constant_split()
    l2 = ALPHA / len(split.train_y)
    generate(split, l2, args.out, counts=(0, 100, 0, 20), split_seed=SPLIT_SEED)


if __name__ == "__main__":
    main()
