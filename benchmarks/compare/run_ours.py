"""logix_func's pipeline: LoGra (or full gradients) + EKFAC, through the public API.

Stages: ``log_dataset`` of the training gradients to a LogStore in WORKDIR (extract),
``fit_curvature(method="ekfac")`` with its default Fisher (``"auto"``: the expectation over
all labels for these 10 classes) saved with ``save_state`` (curvature), then the query
gradients, ``preconditioner(factors)`` (damping 0.1 × each layer's mean eigenvalue) and
``influence`` over the store (score). Options: ``{"rank": 64, "fisher": "auto", "seed": 0}``
(``rank: null`` = full gradients; ``fisher: "true"`` = one sampled label per example).
"""

from __future__ import annotations

import os

import torch
from common import Recorder, batches, build_model, load_problem, parse_args

import logix_func as lf
from logix_func.pipeline import fit_curvature, log_dataset


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    params = problem["params"]
    model = build_model(params)
    train = batches(problem["train"], args.batch_size)
    query = batches(problem["query"], args.batch_size)
    rank = args.options.get("rank", 64)
    fisher, seed = args.options.get("fisher", "auto"), args.options.get("seed", 0)

    rec = Recorder()
    spec = lf.logra(model, rank=rank)
    with rec.stage("extract"):
        store = log_dataset(
            model,
            params,
            train,
            spec,
            os.path.join(args.workdir, "train"),
            progress=False,
            ids=lambda batch, offset: lf.index_ids(offset, len(batch[1])),  # training positions
        )
    with rec.stage("curvature"):
        factors = fit_curvature(
            model, params, train, spec, method="ekfac", fisher=fisher, seed=seed, progress=False
        )
        lf.save_state(factors, os.path.join(args.workdir, "factors.pt"))
    with rec.stage("score"):
        pre = lf.preconditioner(factors)
        rows = [lf.projected_grads(model, params, b, spec) for b in query]
        query_rows = {k: torch.cat([r[k] for r in rows]).float() for k in rows[0]}
        scores = lf.influence(query_rows, store, preconditioner=pre)
        ordered = torch.empty_like(scores)
        ordered[:, torch.as_tensor(store.ids())] = scores  # columns by training position
    rec.finish(args.result, ordered, args.workdir, logix_func=lf.__file__)


if __name__ == "__main__":
    main()
