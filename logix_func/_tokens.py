"""Per-token influence: a sequence's score split over its positions.

A covered layer's gradient of one training sequence is a sum over the positions where the layer
runs, ``G = Σ_t δ_t a_tᵀ`` (``a_t`` its input at position ``t``, ``δ_t`` the gradient of the
*sequence's* loss with respect to its output there), and so is the projected gradient,
``Σ_t (P_out δ_t)(P_in a_t)ᵀ``. The score of query ``q`` therefore splits exactly as

    k(q, n) = Σ_t k(q, n, t),   k(q, n, t) = Σ_layers ⟨P g_q, (P_out δ_t)(P_in a_t)ᵀ⟩,

from the per-token projected inputs and output gradients that
``projected_grads(..., return_activations=True)`` returns: no extra backward pass. This is the
split of Kronfluence's per-token scores and of Grosse et al. (2023): position ``t`` collects what
flows through the layers at ``t``, which is not the gradient of the loss *on* token ``t`` alone
(that one needs a backward pass per token).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from ._origin import Provenance, check_provenance
from .curvature import IdentityPreconditioner

Precondition = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def token_influence(
    query_rows: Mapping[str, Float[Tensor, "query k_out k_in"]],
    train_logs: Mapping[str, Mapping[str, Tensor]],
    *,
    preconditioner: Precondition | None = None,
    query_provenance: Provenance | None = None,
    train_provenance: Provenance | None = None,
) -> Float[Tensor, "query train tokens"]:
    """Influence of every position of every training sequence on every query.

    Args:
        query_rows: ``{layer: [Q, k_out, k_in]}``, the queries' projected gradients.
        train_logs: the logs of ``projected_grads(model, params, train_batch, spec,
            return_activations=True)``: ``{layer: {"activations": [N, T', k_in],
            "backprops": [N, T', k_out], ...}}``, padded positions zero.
        preconditioner: ``grads -> H⁻¹ grads`` applied to the queries; ``None`` = identity.
        query_provenance: what produced the query rows, ``lf.provenance(model, params,
            spec)``: query rows, logs and the preconditioner's factors from different specs or
            weights are refused.
        train_provenance: what produced the logs, likewise.

    Returns:
        ``[Q, N, T]`` with ``T`` the sequence length: summed over ``T`` it is the
        ``mode="dot"`` influence of the sequences. A layer whose calls cover the sequence
        several times (a tied head and embedding, a module called twice) has ``T' = m·T``
        tokens, ``m`` blocks of ``T`` positions in call order; they are added position by position.
    """
    check_provenance(
        {
            "the query rows": query_provenance,
            "the training logs": train_provenance,
            "the preconditioner's curvature factors": getattr(preconditioner, "provenance", None),
        }
    )
    if set(query_rows) != set(train_logs):
        raise ValueError(
            f"query layers {sorted(query_rows)} do not match the logs' layers {sorted(train_logs)}"
        )
    pre = IdentityPreconditioner() if preconditioner is None else preconditioner
    conditioned = pre(dict(query_rows))
    length = min(log["activations"].shape[1] for log in train_logs.values())
    total = None
    for name, log in train_logs.items():
        a, b, q = log["activations"], log["backprops"], conditioned[name]
        if q.shape[1:] != (b.shape[-1], a.shape[-1]):
            raise ValueError(
                f"layer {name!r}: query rows of shape {tuple(q.shape[1:])} do not match the logs' "
                f"ranks {(b.shape[-1], a.shape[-1])} (computed with another projection?)"
            )
        n, tokens = a.shape[:2]
        if tokens % length:
            raise ValueError(
                f"layer {name!r} has {tokens} tokens per sequence, not a multiple of the sequence "
                f"length {length}: its tokens are not the sequence's positions (a convolution?); "
                "leave it out of the spec"
            )
        acc = torch.promote_types(q.dtype, torch.float32)
        qa = torch.einsum("qkj,ntj->qntk", q.to(acc), a.to(acc))
        s = (qa * b.to(acc)).sum(-1).reshape(q.shape[0], n, tokens // length, length).sum(2)
        total = s if total is None else total + s
    return total
