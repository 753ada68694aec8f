"""logix_func's pipeline: LoGra (or full gradients) + its default curvature, through the public API.

Stages: ``log_dataset`` of the training gradients to a LogStore in WORKDIR (extract),
``fit_curvature`` (default ``method="auto"``: under the default Fisher, the expectation over
all labels for these 10 classes, the dense per-layer GGN where k ≤ 4096 and EKFAC for the
larger layers) saved with ``save_state`` (curvature), then the query gradients,
``preconditioner(factors)`` (damping 0.1 × each layer's mean eigenvalue) and ``influence``
over the store (score). Options: ``{"rank": 64, "method": "auto", "fisher": "auto", "seed":
0}`` (``rank: null`` = full gradients; ``fisher: "true"`` = one sampled label per example,
under which ``"auto"`` is EKFAC).
"""

from __future__ import annotations

from common import Recorder, batches, build_model, load_problem, logix_func_scores, parse_args

import logix_func as lf


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    params = problem["params"]
    model = build_model(params)
    train = batches(problem["train"], args.batch_size)
    query = batches(problem["query"], args.batch_size)
    rank = args.options.get("rank", 64)
    fisher, seed = args.options.get("fisher", "auto"), args.options.get("seed", 0)
    method = args.options.get("method", "auto")

    rec = Recorder()
    spec = lf.logra(model, rank=rank)
    ordered = logix_func_scores(
        model,
        params,
        train,
        query,
        spec,
        args.workdir,
        rec,
        method=method,
        fisher=fisher,
        seed=seed,
    )
    rec.finish(args.result, ordered, args.workdir, logix_func=lf.__file__)


if __name__ == "__main__":
    main()
