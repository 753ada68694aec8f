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
import torch
import torch.nn.functional as F
from common import Recorder, build_model, load_problem, parse_args
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch.utils.data import TensorDataset


class Classification(Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


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
    with rec.stage("curvature"):
        analyzer.fit_all_factors(
            "ekfac",
            dataset=train,
            per_device_batch_size=args.batch_size,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
    with rec.stage("score"):
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=args.batch_size,
            per_device_train_batch_size=args.batch_size,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    rec.finish(args.result, scores, args.workdir, kronfluence=kronfluence.__version__)


if __name__ == "__main__":
    main()
