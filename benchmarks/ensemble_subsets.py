"""LDS of ensembles of MLPs each trained on its own random half of the training set (TRAK's
recipe for diverse members), against the ground truth's full-data members.

    python -m benchmarks.ensemble_subsets [--data tests/data/lds_mlp.npz] [--members 5]

Members: ``digits.train_mlps`` with seeds ``100 ..`` on halves drawn with seed 12345 (apart from
the ground truth's subsets), the width and depth of ``--data``'s model. Each member's
attribution: full gradients of all 1300 training rows, ``fit_curvature(method="dual_ggn")`` over
its own half (``own``) or all rows (``all``), the default damping or the objective's weight
decay, and the mean of the members' scores. Printed per member: its LDS and the ensemble's so
far.
"""

from __future__ import annotations

import argparse

import torch

import logix_func as lf
from benchmarks.lds_data import load_ground_truth
from logix_func.demo import digits
from logix_func.pipeline import fit_curvature


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tests/data/lds_mlp.npz")
    parser.add_argument("--members", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gt = load_ground_truth(args.data, members=1)
    model, (x, y) = gt.model, (gt.split.train_x, gt.split.train_y)
    test = (gt.split.test_x, gt.split.test_y)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    width, depth = linears[0].out_features, len(linears) - 1
    gen = torch.Generator().manual_seed(12345)
    masks = torch.stack(
        [torch.randperm(len(y), generator=gen) < len(y) // 2 for _ in range(args.members)]
    )
    seeds = list(range(100, 100 + args.members))
    stacked = digits.train_mlps(x, y, seeds, masks, width=width, depth=depth)
    print(f"ground truth {args.data}: {gt.describe}; {args.members} members on random halves")
    spec = lf.logra(model, rank=None)
    totals: dict[tuple[str, float | None], torch.Tensor] = {}
    for k in range(args.members):
        params = {n: v[k] for n, v in stacked.items()}
        train = lf.projected_grads(model, params, (x, y), spec)
        query = lf.projected_grads(model, params, test, spec)
        for rows in ("own", "all"):
            xs, ys = (x[masks[k]], y[masks[k]]) if rows == "own" else (x, y)
            loader = list(zip(xs.split(325), ys.split(325), strict=True))
            factors = fit_curvature(
                model, params, loader, spec, method="dual_ggn", fisher="exact", progress=False
            )
            for damping in (None, digits.MLP_WEIGHT_DECAY):
                pre = lf.preconditioner(factors, damping=damping)
                scores = lf.influence(query, train, preconditioner=pre).double()
                key = (rows, damping)
                totals[key] = scores if key not in totals else totals[key] + scores
                mean = gt.lds(totals[key] / (k + 1))
                print(
                    f"member {k}, curvature over {rows} rows, damping {damping}: "
                    f"LDS {gt.lds(scores):.3f}, mean of {k + 1}: {mean:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
