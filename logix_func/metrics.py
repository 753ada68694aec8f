"""Accuracy metrics for attribution scores: correlations, leave-one-out agreement and LDS.

Sign convention of logix_func scores: ``score[q, i] > 0`` means training example i helps query
q, i.e. removing i raises q's loss. Scores are not divided by the training-set size N: for a
mean-loss objective the predicted leave-one-out change of q's loss is ``score[q, i] / N``.

All functions accept torch tensors or numpy arrays and compute in float64.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _as_float64(x: ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def rankdata(x: Float[ArrayLike, "*batch n"]) -> Float[Tensor, "*batch n"]:
    """Ranks 1..n along the last dimension, ties get their average rank (scipy's ``average``)."""
    x = _as_float64(x, "x")
    ordered = x.sort(dim=-1).values.contiguous()
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    up_to = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + up_to + 1).to(torch.float64) / 2


def pearson(
    a: Float[ArrayLike, "*batch n"], b: Float[ArrayLike, "*batch n"]
) -> Float[Tensor, "*batch"]:
    """Pearson correlation along the last dimension; NaN where either side is constant."""
    a, b = _as_float64(a, "a"), _as_float64(b, "b")
    if a.shape != b.shape or a.shape[-1] < 2:
        raise ValueError(f"pearson needs equal shapes with >= 2 entries, got {a.shape}, {b.shape}")
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    corr = (a * b).sum(dim=-1) / denom
    return torch.where(denom > 0, corr.clamp(-1, 1), torch.nan)


def spearman(
    a: Float[ArrayLike, "*batch n"], b: Float[ArrayLike, "*batch n"]
) -> Float[Tensor, "*batch"]:
    """Spearman rank correlation along the last dimension (Pearson of average ranks)."""
    return pearson(rankdata(a), rankdata(b))


def loo_correlation(
    predicted: Float[ArrayLike, "*shape"], actual: Float[ArrayLike, "*shape"]
) -> tuple[float, float]:
    """``(pearson, spearman)`` between predicted and actual leave-one-out changes, all entries.

    ``predicted`` is typically ``scores / N`` (the predicted rise of each query loss when the
    example is removed) and ``actual`` the retrained loss minus the full-model loss. Both are
    flattened, so a ``[Q, M]`` pair is compared over all Q * M (query, removed) entries.
    """
    p, a = _as_float64(predicted, "predicted"), _as_float64(actual, "actual")
    if p.shape != a.shape:
        raise ValueError(f"predicted {tuple(p.shape)} and actual {tuple(a.shape)} differ in shape")
    return float(pearson(p.flatten(), a.flatten())), float(spearman(p.flatten(), a.flatten()))


def lds(
    scores: Float[ArrayLike, "q n"],
    subsets: Bool[ArrayLike, "s n"],
    outputs: Float[ArrayLike, "s q"],
    *,
    measurement: Literal["loss", "gain"] = "loss",
) -> tuple[float, Float[Tensor, " q"]]:
    """Linear datamodeling score (Park et al., 2023): ``(mean over queries, per query)``.

    For each subset s the group prediction is ``Σ_{i in s} scores[q, i]``, signed by what the
    measured ``outputs[s, q]`` is: ``measurement="loss"`` for outputs that fall when training
    data helps (a loss; prediction ``-Σ score``), ``"gain"`` for outputs that rise (a margin, a
    log-probability, an accuracy; prediction ``+Σ score``). Per query the LDS is the Spearman
    correlation over the S subsets between prediction and output. Queries whose outputs (or
    predictions) are constant over subsets get NaN and are left out of the mean.
    """
    if measurement not in ("loss", "gain"):
        raise ValueError(f"measurement must be 'loss' or 'gain', got {measurement!r}")
    scores, outputs = _as_float64(scores, "scores"), _as_float64(outputs, "outputs")
    subsets = torch.as_tensor(subsets)
    if subsets.dtype != torch.bool:
        raise ValueError(f"subsets must be a boolean mask [S, N], got dtype {subsets.dtype}")
    (q, n), (s, n_mask) = scores.shape, subsets.shape
    if n_mask != n or outputs.shape != (s, q):
        raise ValueError(
            f"shapes disagree: scores [Q={q}, N={n}], subsets [S={s}, N={n_mask}], "
            f"outputs {list(outputs.shape)} (expected [S={s}, Q={q}])"
        )
    predicted = subsets.to(torch.float64) @ scores.T  # [S, Q]
    if measurement == "loss":
        predicted = -predicted
    per_query = spearman(predicted.T, outputs.T)
    if per_query.isnan().all():
        raise ValueError("every query has constant outputs or predictions: LDS is undefined")
    return float(per_query.nanmean()), per_query
