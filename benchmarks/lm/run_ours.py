"""logix_func on the Shakespeare GPT, through the public API.

Stages: ``log_dataset`` of the training windows' gradients to a LogStore in WORKDIR (extract),
``fit_curvature`` saved with ``save_state`` (curvature), then the query gradients,
``preconditioner(factors)`` (the default damping) and ``influence`` over the store (score).
Every layer ``lf.logra`` covers by default (both embeddings, every Linear). Loss: the default,
the sum of a window's token cross-entropies. Options: ``{"rank": 64, "method": "ekfac",
"fisher": "true"}`` (``rank: null`` = full gradients).
"""

from __future__ import annotations

import os

import torch

import logix_func as lf
from benchmarks.compare.common import Recorder, load_problem, parse_args
from benchmarks.lm.problem import build_model, window_batches
from logix_func.pipeline import fit_curvature, log_dataset


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    params = problem["params"]
    model = build_model(params)
    train = window_batches(problem["train"], args.batch_size)
    query = window_batches(problem["query"], args.batch_size)
    rank = args.options.get("rank", 64)
    method, fisher = args.options.get("method", "ekfac"), args.options.get("fisher", "true")

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
            model, params, train, spec, method=method, fisher=fisher, progress=False
        )
        lf.save_state(factors, os.path.join(args.workdir, "factors.pt"))
    with rec.stage("score"):
        pre = lf.preconditioner(factors)
        rows = [lf.projected_grads(model, params, b, spec) for b in query]
        query_rows = {k: torch.cat([r[k] for r in rows]).float() for k in rows[0]}
        scores = lf.influence(query_rows, store, preconditioner=pre)
        ordered = torch.empty_like(scores)
        ordered[:, torch.as_tensor(store.ids())] = scores  # columns by training position
    rec.finish(args.result, ordered, args.workdir, logix_func=lf.__file__, layers=list(spec.layers))


if __name__ == "__main__":
    main()
