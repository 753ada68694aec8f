"""logix_func on the Shakespeare GPT, through the public API.

Stages: ``log_dataset`` of the training windows' gradients to a LogStore in WORKDIR (extract),
``fit_curvature`` saved with ``save_state`` (curvature), then the query gradients,
``preconditioner(factors)`` (the default damping) and ``influence`` over the store (score).
Every layer ``lf.logra`` covers by default (both embeddings, every Linear). Loss: the default,
the sum of a window's token cross-entropies. Options: ``{"rank": 64, "method": "ekfac",
"fisher": "true"}`` (``rank: null`` = full gradients).
"""

from __future__ import annotations

import logix_func as lf
from benchmarks.compare.common import Recorder, load_problem, logix_func_scores, parse_args
from benchmarks.lm.problem import build_model, window_batches


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
    ordered = logix_func_scores(
        model, params, train, query, spec, args.workdir, rec, method=method, fisher=fisher
    )
    rec.finish(args.result, ordered, args.workdir, logix_func=lf.__file__, layers=list(spec.layers))


if __name__ == "__main__":
    main()
