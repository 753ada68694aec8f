"""Kronfluence with EKFAC, its documented workflow; run with the peers' python.

A ``Task`` with the summed cross-entropy as training loss (labels sampled from the model for
the true Fisher when ``sample=True``) and as measurement; ``prepare_model``; an ``Analyzer``
on the CPU writing to WORKDIR; ``fit_all_factors(strategy="ekfac")`` (covariances,
eigendecomposition, eigenvalue correction: curvature); ``compute_pairwise_scores`` with
``damping_factor=None`` = 0.1 × each layer's mean eigenvalue, the same policy as ours (score;
Kronfluence computes the training gradients inside this stage, so extract is empty).
"""

from __future__ import annotations

import kronfluence
from common import Recorder, build_model, load_problem, parse_args
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence_ekfac import Classification, ekfac_scores
from torch.utils.data import TensorDataset


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    model = build_model(problem["params"])
    train, query = TensorDataset(*problem["train"]), TensorDataset(*problem["query"])

    rec = Recorder()
    task = Classification()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        "compare", model, task, cpu=True, disable_tqdm=True, output_dir=args.workdir
    )
    scores = ekfac_scores(analyzer, train, query, args.batch_size, stage=rec.stage)
    rec.finish(args.result, scores, args.workdir, kronfluence=kronfluence.__version__)


if __name__ == "__main__":
    main()
