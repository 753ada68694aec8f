"""Kronfluence with EKFAC on the Shakespeare GPT, its documented language-model workflow; run
with the peers' python.

A ``Task`` whose training loss is the summed token cross-entropy (targets sampled from the
model's own distribution for the true Fisher when ``sample=True``) and whose measurement is the
same summed loss of a query window; ``prepare_model`` (Kronfluence tracks every ``nn.Linear``:
the embeddings are not covered); ``fit_all_factors(strategy="ekfac")`` (curvature);
``compute_pairwise_scores`` with ``damping_factor=None`` = 0.1 × each layer's mean eigenvalue
(score; Kronfluence computes the training gradients inside this stage, so extract is empty).
"""

from __future__ import annotations

import kronfluence
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.task import Task
from torch.utils.data import TensorDataset

from benchmarks.compare.common import Recorder, load_problem, parse_args
from benchmarks.compare.kronfluence_ekfac import ekfac_scores
from benchmarks.lm.problem import build_model


class LanguageModeling(Task):
    def compute_train_loss(self, batch, model, sample=False):
        (w,) = batch
        logits = model(w[:, :-1])
        targets = w[:, 1:]
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), -1)
                targets = torch.multinomial(probs.flatten(0, 1), 1).view(targets.shape)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")

    def compute_measurement(self, batch, model):
        (w,) = batch
        return F.cross_entropy(model(w[:, :-1]).transpose(1, 2), w[:, 1:], reduction="sum")


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    model = build_model(problem["params"])
    train, query = TensorDataset(problem["train"]), TensorDataset(problem["query"])

    rec = Recorder()
    task = LanguageModeling()
    model = prepare_model(model, task)
    analyzer = Analyzer("lm", model, task, cpu=True, disable_tqdm=True, output_dir=args.workdir)
    scores = ekfac_scores(analyzer, train, query, args.batch_size, stage=rec.stage)
    rec.finish(args.result, scores, args.workdir, kronfluence=kronfluence.__version__)


if __name__ == "__main__":
    main()
