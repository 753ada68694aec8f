"""The per-layer GGN in the projected space against EKFAC: LDS and cost, side by side.

    python -m benchmarks.ggn [--data tests/data/lds_mlp.npz] [--ranks full 16 64] [--repeats 3]
        [--methods ekfac ggn joint_ggn dual_ggn auto]

Accuracy: LDS (``measurement="loss"``, every test point) on the digits-MLP ground truth of
``--data`` for ``fit_curvature(method=...)`` with the exact Fisher and the default damping
(0.1 × each layer's mean eigenvalue), EKFAC against ``method="ggn"`` (per layer),
``method="joint_ggn"`` (all layers together, cross-layer blocks included), ``"dual_ggn"``
(the same matrix kept as its rows, solved in sample space) and ``method="auto"``, per
projection (``--methods``: a subset, EKFAC first).

Cost: wall time of fitting plus building the preconditioner (GGN: its Cholesky factors), the
methods interleaved ``--repeats`` times in one process (best of each, one thread) on the
ground-truth MLP and on ``64-128-128-10`` (timing only, random weights), per rank: the ratios
to EKFAC are the figures to read. Then, on the ground-truth MLP, the time of applying each
preconditioner to the test points' gradients once (what scoring adds to the dot products).
``--repeats 0``: accuracy only.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import logix_func as lf
from benchmarks.lds_data import load_ground_truth
from benchmarks.logra_models import best_times
from logix_func.pipeline import fit_curvature

METHODS = ("ekfac", "ggn", "joint_ggn", "dual_ggn", "auto")


def fitted(model, params, loader, spec, method):
    factors = fit_curvature(
        model, params, loader, spec, method=method, fisher="exact", progress=False
    )
    return lf.preconditioner(factors)


def costs(model, params, loader, spec, repeats: int, methods) -> dict[str, float]:
    runs = {m: (lambda m=m: fitted(model, params, loader, spec, m)) for m in methods}
    return best_times(runs, repeats)


def spec_of(model, rank: str):
    return lf.logra(model, rank=None if rank == "full" else int(rank))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tests/data/lds_mlp.npz")
    parser.add_argument("--ranks", nargs="+", default=["full", "16", "64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args(argv)
    methods = ["ekfac"] + [m for m in args.methods if m != "ekfac"]
    torch.set_num_threads(1)
    gt = load_ground_truth(args.data, members=1)
    model, params = gt.model, gt.params[0]
    x, y = gt.split.train_x, gt.split.train_y
    loader = list(zip(x.split(325), y.split(325), strict=True))
    test = (gt.split.test_x, gt.split.test_y)
    print(f"ground truth {args.data}: {gt.describe}")
    print(f"{'projection':10s} " + " ".join(f"{'LDS ' + m:>9s}" for m in methods), end="")
    ratios = " ".join(f"{m + '/ekfac':>15s}" for m in methods[1:])
    print(" " + " ".join(f"{m + ' s':>11s}" for m in methods) + f" {ratios}")
    for rank in args.ranks:
        spec = spec_of(model, rank)
        train = lf.projected_grads(model, params, (x, y), spec)
        query = lf.projected_grads(model, params, test, spec)
        pre = {m: fitted(model, params, loader, spec, m) for m in methods}
        scores = {m: lf.influence(query, train, preconditioner=pre[m]) for m in methods}
        lds = " ".join(f"{gt.lds(scores[m]):9.3f}" for m in methods)
        if args.repeats == 0:  # accuracy only
            print(f"{rank:10s} {lds}", flush=True)
            continue
        fit = costs(model, params, loader, spec, args.repeats, methods)
        print(f"{rank:10s} {lds} {timing(methods, fit)}")
        apply = {m: (lambda m=m, p=pre, q=query: p[m](q)) for m in methods}
        applied = best_times(apply, args.repeats)
        print(f"{'':10s} applied to the {len(test[1])} queries: {timing(methods, applied)}")
    torch.manual_seed(0)
    wide = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    ).to(x.dtype)
    wide_params = {k: v.detach() for k, v in wide.named_parameters()}
    print("64-128-128-10, random weights, same 1300 rows (timing only)")
    for rank in [r for r in args.ranks if r != "full" and args.repeats > 0]:
        t = costs(wide, wide_params, loader, spec_of(wide, rank), args.repeats, methods)
        print(f"{rank:10s} {'':{10 * len(methods) - 1}s} {timing(methods, t)}", flush=True)


def timing(methods, t: dict[str, float]) -> str:
    """Seconds per method, then the ratios to EKFAC."""
    seconds = " ".join(f"{t[m]:11.2f}" for m in methods)
    return seconds + " " + " ".join(f"{t[m] / t['ekfac']:15.1f}" for m in methods[1:])


if __name__ == "__main__":
    main()
