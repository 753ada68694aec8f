"""LDS of ensembles of independently trained digits MLPs (``lf.ensemble_influence``).

    python -m benchmarks.ensemble [--data tests/data/lds_mlp.npz] [--members 5] [--ranks full 16]

Members: the full-data MLPs of seeds ``0 .. members-1`` (see ``benchmarks/lds_data.py``), each
with its own projection (``lf.logra(model_k, rank, seed=k)``), rows, curvature
(``fit_curvature(method, fisher="exact")``, default damping; ``--methods exact_hessian``: the
exact Hessian of the mean loss over all layers, ``lf.exact_curvature(kind="hessian",
joint=True)``, which needs ``--damping`` above its most negative eigenvalue) and query rows;
the ensemble is the mean of their scores (TRAK). Each member's preconditioner is applied to
its query rows up front, so that only rows are held across members.

Printed per curvature and projection: each member's own LDS, their mean, and the LDS of the
ensemble of the first 1, 2, …, ``members`` members; then two diagnostics of the full
ensemble: the mean per-query Pearson correlation between two members' scores (how much
there is to average away) and the LDS with each member's scores divided by their standard
deviation (whether the members' scales differ enough to matter).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import logix_func as lf
from benchmarks.lds_data import load_ground_truth
from logix_func.pipeline import fit_curvature


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tests/data/lds_mlp.npz")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--ranks", nargs="+", default=["full", "16"])
    parser.add_argument("--methods", nargs="+", default=["ggn", "ekfac"])
    parser.add_argument(
        "--damping", type=float, default=None, help="absolute damping (default: the default rule)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    gt = load_ground_truth(args.data, members=args.members)
    model = gt.model
    x, y = gt.split.train_x, gt.split.train_y
    loader = list(zip(x.split(325), y.split(325), strict=True))
    test = (gt.split.test_x, gt.split.test_y)
    print(f"ground truth {args.data}: {gt.describe}; {args.members} members")
    header = " ".join(f"{f'K={k}':>6s}" for k in range(1, args.members + 1))
    print(f"{'curvature':8s} {'projection':10s} {'members (own LDS)':>36s} {'mean':>6s} | {header}")
    for method in args.methods:
        for rank in args.ranks:
            members, queries, own, scores = [], [], [], []
            for k, params in enumerate(gt.params):
                spec = lf.logra(model, rank=None if rank == "full" else int(rank), seed=k)
                train = lf.projected_grads(model, params, (x, y), spec)
                if method == "exact_hessian":  # all layers, cross-layer blocks included
                    factors = lf.exact_curvature(
                        model, params, loader, spec, kind="hessian", joint=True, dtype=x.dtype
                    )
                else:
                    factors = fit_curvature(
                        model, params, loader, spec, method=method, fisher="exact", progress=False
                    )
                # P_k applied to the queries once (k(q, t) = ⟨P_k g_q, g_t⟩): the members then
                # hold no factors, which for full-gradient GGNs are gigabytes each
                query = lf.preconditioner(factors, args.damping)(
                    lf.projected_grads(model, params, test, spec)
                )
                del factors
                members.append(lf.Member(train))
                queries.append(query)
                scores.append(lf.influence(query, train).double())
                own.append(gt.lds(scores[-1]))
            combined = [
                gt.lds(lf.ensemble_influence(queries[:k], members[:k]))
                for k in range(1, args.members + 1)
            ]
            print(
                f"{method:8s} {rank:10s} {' '.join(f'{v:.3f}' for v in own):>36s} "
                f"{np.mean(own):6.3f} | " + " ".join(f"{v:6.3f}" for v in combined),
                flush=True,
            )
            stacked = torch.stack(scores)  # [K, Q, N]
            centred = stacked - stacked.mean(-1, keepdim=True)
            unit = centred / centred.norm(dim=-1, keepdim=True)
            pairs = torch.einsum("aqn,bqn->abq", unit, unit).mean(-1)
            apart = pairs[~torch.eye(len(pairs), dtype=torch.bool)].mean()
            scaled = (stacked / stacked.std(dim=(1, 2), keepdim=True)).mean(0)
            print(
                f"{'':19s} member score correlation {apart:.3f}, "
                f"LDS of the std-normalised mean {gt.lds(scaled):.3f}",
                flush=True,
            )
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
