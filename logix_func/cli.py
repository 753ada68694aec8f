"""The ``logix-func`` command: end-to-end attribution on scikit-learn's digits.

Trains the reference MLP (cached), logs LoGra-projected per-sample gradients of the whole
training set to a store, fits the curvature, scores test images, prints their top proponents
and opponents, and saves a picture of them. Every stage resumes: a rerun reuses what the run
folder already holds.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from .curvature import load_state, preconditioner, save_state
from .digits import digits_split, mlp_model, train_mlp
from .influence import TopK, influence, top_k
from .pipeline import fit_curvature, log_dataset
from .projected import projected_grads
from .projection import logra


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="logix-func", description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/digits", help="run folder or tensorstore URL")
    p.add_argument("--rank", type=int, default=16, help="LoGra rank per side (0: no projection)")
    p.add_argument(
        "--preconditioner", choices=["ekfac", "kfac", "raw", "identity"], default="ekfac"
    )
    p.add_argument("--fisher", choices=["auto", "true", "empirical", "exact"], default="auto")
    p.add_argument(
        "--damping",
        type=float,
        default=None,
        help="absolute damping (default: 0.1 × mean eigenvalue per layer)",
    )
    p.add_argument(
        "--queries",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3],
        help="positions in the test split to explain",
    )
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--png", default=None, help="picture path (default: RUN/influence.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def _cached(url: str, make: Any) -> Any:
    """The value saved at ``url``, or ``make()`` saved there on the first run."""
    try:
        return load_state(url)
    except FileNotFoundError:
        pass
    value = make()
    save_state(value, url)
    return value


def print_attributions(data: Any, queries: list[int], helps: TopK, hurts: TopK) -> None:
    """Each query test image's proponents and opponents: training ids, labels and scores."""
    for i, q in enumerate(queries):
        print(f"test image {q} (label {data.test_y[q].item()}):")
        for title, best in (("proponents", helps), ("opponents", hurts)):
            items = ", ".join(
                f"#{int(t)} (label {data.train_y[int(t)].item()}, {v:+.3g})"
                for t, v in zip(best.ids[i], best.values[i].tolist(), strict=True)
            )
            print(f"  {title}: {items}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    progress = not args.no_progress
    run = args.run.rstrip("/")
    data = digits_split(torch.float32)
    model = mlp_model(dtype=torch.float32).eval()
    params = _cached(f"{run}/model.pt", lambda: train_mlp(data.train_x, data.train_y, args.seed))
    params = {k: v.to(torch.float32) for k, v in params.items()}
    accuracy = torch.func.functional_call(model, params, (data.test_x,)).argmax(1) == data.test_y
    print(f"model: MLP 64-32-10, test accuracy {accuracy.float().mean():.3f}")

    spec = logra(model, rank=args.rank or None, seed=args.seed)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=args.batch_size)
    store = log_dataset(model, params, loader, spec, f"{run}/train", progress=progress)
    print(f"store: {len(store)} training rows at {store.url}")

    if args.preconditioner == "identity":
        pre = preconditioner(None)
    else:
        name = f"{run}/{args.preconditioner}-{args.fisher}.pt"
        factors = _cached(
            name,
            lambda: fit_curvature(
                model,
                params,
                loader,
                spec,
                method=args.preconditioner,
                fisher=args.fisher,
                seed=args.seed,
                progress=progress,
            ),
        )
        pre = preconditioner(factors, args.damping)

    queries = torch.tensor(args.queries)
    query_rows = projected_grads(model, params, (data.test_x[queries], data.test_y[queries]), spec)
    scores = influence(query_rows, store, preconditioner=pre, progress=progress)
    ids = store.ids()
    helps = top_k(scores, args.top, ids=ids)
    hurts = top_k(scores, args.top, ids=ids, largest=False)
    print_attributions(data, args.queries, helps, hurts)
    png = args.png or (os.path.join(run, "influence.png") if "://" not in run else "influence.png")
    from .plots import influence_grid

    influence_grid(data, args.queries, helps, hurts, png)
    print(f"picture: {png}")


if __name__ == "__main__":
    main()
