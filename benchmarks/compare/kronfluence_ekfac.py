"""Kronfluence's documented EKFAC workflow, shared by every runner that uses it; peers' python.

``fit_all_factors(strategy="ekfac")`` (covariances, eigendecomposition, eigenvalue correction)
then ``compute_pairwise_scores`` (Kronfluence computes the training gradients inside it), and a
``Task`` for ``(inputs, targets)`` classification: the summed cross-entropy as training loss
(labels sampled from the model for the true Fisher when ``sample=True``) and as measurement.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import Tensor
from torch.utils.data import Dataset


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


def ekfac_scores(
    analyzer: Analyzer,
    train: Dataset,
    query: Dataset,
    batch_size: int,
    *,
    damping: float | None = None,
    stage=None,
) -> Tensor:
    """Scores ``[Q, N]`` of Kronfluence's EKFAC; ``damping=None`` is its default, 0.1 × each
    layer's mean eigenvalue. ``stage(name)``, where given, times the "curvature" and "score"
    steps (a ``Recorder.stage``)."""
    stage = stage or (lambda name: contextlib.nullcontext())
    with stage("curvature"):
        analyzer.fit_all_factors(
            "ekfac",
            dataset=train,
            per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
    with stage("score"):
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=batch_size,
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("scores")["all_modules"]
