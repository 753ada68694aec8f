"""Which labels curvature logs are computed with: the data's, sampled ones, or all of them.

* ``"empirical"``: the batch's own targets.
* ``"true"``: targets drawn from the model's predictive distribution (categorical for integer
  targets, unit-variance Gaussian around the outputs for float targets), one draw per sample.
  A custom ``loss_fn`` brings its own ``label_sampler(outputs, targets, generator)``: the
  targets drawn from the distribution that loss is the negative log-likelihood of.
* ``"exact"``: the expectation over every label, through pseudo-losses ``⟨v_c, logits⟩`` whose
  gradients ``v_c`` factor the output Hessian (``Σ_c v_c v_cᵀ = diag(p) − p pᵀ`` for
  cross-entropy, ``I`` for squared error): one batched pass over
  every (sample, class) pair, so for few classes only.
* ``"auto"`` (the default): ``"exact"`` where it is cheap — ``(inputs, targets)`` batches with
  the default loss and at most `EXACT_MAX_OUTPUTS` outputs per sample, i.e. at most that many
  backward passes per sample — and ``"true"`` elsewhere (language models, many classes,
  custom losses are refused by both). The expectation is deterministic: it removes the
  sampling noise of one drawn label per sample, which moves attribution accuracy by a few
  hundredths from seed to seed (docs/validation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._batch import IGNORE_INDEX, ModelBatch, is_causal_lm, logits_of
from ._grads import split_weights
from ._projected_grads import projected_grads
from .curvature._kfac import FISHERS, Fisher
from .typing import Spec

EXACT_MAX_OUTPUTS = 16


def _with_targets(batch: Any, targets: Tensor) -> Any:
    if isinstance(batch, Mapping):
        return {**batch, "labels": targets}
    return (batch[0], targets)


LabelSampler = Callable[[Any, Tensor, torch.Generator], Tensor]


@torch.no_grad()
def _outputs(model: nn.Module, params: Mapping[str, Tensor], mb: ModelBatch) -> Any:
    fixed, bufs = split_weights(model, params)
    return mb.call(model, ({n: p.detach() for n, p in params.items()}, fixed, bufs))


def _logits(model: nn.Module, params: Mapping[str, Tensor], mb: ModelBatch) -> Tensor:
    return logits_of(_outputs(model, params, mb))


def _sampled_by(
    label_sampler: LabelSampler,
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    seed: int = 0,
) -> Any:
    """``batch`` with its targets replaced by ``label_sampler(outputs, targets, generator)``.

    ``outputs`` are the model's outputs on the whole batch (no gradient), ``targets`` the
    batch's (``[B, ...]``, or the ``labels`` of a dict batch) and ``generator`` a
    ``torch.Generator`` seeded with ``seed``: the drawn targets, of the targets' shape and
    dtype, are those the custom loss is the negative log-likelihood of.
    """
    mb = ModelBatch.from_batch(batch)
    targets = mb.tensors["targets"]
    outputs = _outputs(model, params, mb)
    gen = torch.Generator(device=targets.device).manual_seed(seed)
    drawn = label_sampler(outputs, targets, gen)
    if (
        not isinstance(drawn, Tensor)
        or drawn.shape != targets.shape
        or (drawn.dtype != targets.dtype)
    ):
        got = (tuple(drawn.shape), drawn.dtype) if isinstance(drawn, Tensor) else type(drawn)
        raise ValueError(
            f"label_sampler returned {got}, but the batch's targets are "
            f"{(tuple(targets.shape), targets.dtype)}: it must return targets of that shape "
            "and dtype, drawn from the model's predictive distribution"
        )
    return _with_targets(batch, drawn)


def sample_targets(
    model: nn.Module, params: Mapping[str, Tensor], batch: Any, *, seed: int = 0
) -> Any:
    """``batch`` with its targets replaced by draws from the model's predictive distribution.

    Ignored tokens (-100) stay ignored; for ``*ForCausalLM`` dict batches the draw for token t+1
    comes from the logits at t. ``seed`` fixes the draw (use a different one per batch).
    """
    mb = ModelBatch.from_batch(batch)
    targets = mb.tensors["targets"]
    logits = _logits(model, params, mb).float()
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    if targets.is_floating_point():
        noise = torch.randn(logits.shape, generator=gen, device=logits.device)
        return _with_targets(batch, (logits + noise).to(targets.dtype))
    shift = isinstance(batch, Mapping) and is_causal_lm(model)
    if shift:
        logits = logits[:, :-1]
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
    drawn = torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1])
    sampled = targets.clone()
    if shift:
        sampled[:, 1:] = torch.where(targets[:, 1:] == IGNORE_INDEX, targets[:, 1:], drawn)
    else:
        sampled = torch.where(targets == IGNORE_INDEX, targets, drawn)
    return _with_targets(batch, sampled)


def _pseudo_loss(outputs: Any, direction: Tensor) -> Tensor:
    return (logits_of(outputs) * direction).sum()


def _hessian_factors(logits: Tensor, targets: Tensor) -> list[Tensor]:
    """``v_c`` with ``Σ_c v_c v_cᵀ`` = the loss's Hessian in the logits, zero on ignored tokens."""
    classes = logits.shape[-1]
    eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
    if targets.is_floating_point():
        return [eye[c].expand_as(logits) for c in range(classes)]
    p = logits.softmax(-1)
    keep = (targets != IGNORE_INDEX).unsqueeze(-1).to(p.dtype)
    return [p[..., c : c + 1].sqrt() * (eye[c] - p) * keep for c in range(classes)]


def fisher_logs(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    spec: Spec,
    *,
    fisher: Fisher = "auto",
    seed: int = 0,
    loss_fn: Any = None,
    label_sampler: LabelSampler | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Projected gradients and KFAC logs of ``batch`` under the chosen Fisher.

    ``fisher="true"`` (or ``"auto"``) with a custom ``loss_fn`` needs ``label_sampler(outputs,
    targets, generator) -> targets``, and a sampler makes ``"auto"`` draw with it. ``outputs``
    are the model's on the whole batch (no gradient), ``targets`` the batch's, ``generator`` a
    ``torch.Generator`` seeded with ``seed``; it returns targets of the same shape and dtype
    drawn from the distribution whose negative log-likelihood the loss is. The default losses
    draw their own (:func:`sample_targets`).

    Returns ``(grads, logs)`` as :func:`logix_func.projected_grads` with
    ``return_activations=True``, plus a label-draw axis D after the batch axis:
    grads ``{layer: [B, D, k_out, k_in]}``, backprops ``[B, D, T, k_out]`` (D = 1 unless
    the expectation is exact — ``fisher="exact"``, or ``"auto"`` with few outputs —
    where D = number of classes).
    """
    fisher, logits = _resolved(model, params, batch, fisher, loss_fn, label_sampler)
    if fisher == "exact":
        return _exact_logs(model, params, batch, spec, loss_fn, logits)
    if fisher == "empirical":
        labelled, fn = batch, loss_fn
    elif label_sampler is not None:
        labelled, fn = _sampled_by(label_sampler, model, params, batch, seed=seed), loss_fn
    elif loss_fn is not None:
        raise ValueError(
            "fisher='true' (and 'auto' with a custom loss) draws labels from the model's "
            "predictive distribution, which a custom loss_fn does not say: pass "
            "label_sampler=fn(outputs, targets, generator) -> drawn targets (the distribution "
            "whose negative log-likelihood the loss is), or fisher='empirical'"
        )
    else:
        labelled, fn = sample_targets(model, params, batch, seed=seed), None
    grads, logs = projected_grads(
        model, params, labelled, spec, loss_fn=fn, return_activations=True
    )
    grads = {n: g.unsqueeze(1) for n, g in grads.items()}
    logs = {n: {**log, "backprops": log["backprops"].unsqueeze(1)} for n, log in logs.items()}
    return grads, logs


def resolved_fisher(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    fisher: Fisher = "auto",
    *,
    loss_fn: Any = None,
    label_sampler: LabelSampler | None = None,
) -> Fisher:
    """The Fisher :func:`fisher_logs` computes on ``batch``: ``"auto"`` resolved to ``"exact"``
    (an ``(inputs, targets)`` batch, the default loss, at most `EXACT_MAX_OUTPUTS` outputs, no
    ``label_sampler``) or ``"true"``; a ``label_sampler`` makes it ``"true"``; the others as
    given."""
    return _resolved(model, params, batch, fisher, loss_fn, label_sampler)[0]


def exact_draws(model: nn.Module, params: Mapping[str, Tensor], batch: Any) -> int:
    """``D`` of the exact Fisher on ``batch``: one draw per output class."""
    return _logits(model, params, ModelBatch.from_batch(batch)).shape[-1]


def _resolved(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    fisher: Fisher,
    loss_fn: Any,
    label_sampler: LabelSampler | None,
) -> tuple[Fisher, Tensor | None]:
    """:func:`resolved_fisher` and, where ``"auto"`` resolved to ``"exact"``, the batch's
    logits (computed to count the outputs; the exact pass reuses them)."""
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if label_sampler is not None:
        if fisher not in ("true", "auto"):
            raise ValueError(
                f"label_sampler draws labels for fisher='true' (or 'auto') only, got {fisher!r}"
            )
        return "true", None  # the user's draw: the exact expectation needs the default loss
    if fisher != "auto":
        return fisher, None
    if loss_fn is not None or isinstance(batch, Mapping):
        return "true", None
    logits = _logits(model, params, ModelBatch.from_batch(batch))
    return ("exact", logits) if logits.shape[-1] <= EXACT_MAX_OUTPUTS else ("true", None)


def _exact_logs(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    spec: Spec,
    loss_fn: Any,
    logits: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every sample repeated once per class, each copy with its pseudo-loss: one batched pass."""
    if loss_fn is not None or isinstance(batch, Mapping):
        raise ValueError(
            "fisher='exact' supports (inputs, targets) batches with the default "
            "loss; use fisher='true' for language models or custom losses"
        )
    mb = ModelBatch.from_batch(batch)
    logits = _logits(model, params, mb) if logits is None else logits
    directions = torch.stack(_hessian_factors(logits, mb.tensors["targets"]), dim=1)
    size, draws = directions.shape[:2]
    copies = torch.arange(size, device=directions.device).repeat_interleave(draws)
    repeat = lambda v: v[copies] if isinstance(v, Tensor) else v  # noqa: E731
    inputs = batch[0]
    inputs = tuple(map(repeat, inputs)) if isinstance(inputs, (tuple, list)) else repeat(inputs)
    grads, logs = projected_grads(
        model,
        params,
        (inputs, directions.flatten(0, 1)),
        spec,
        loss_fn=_pseudo_loss,
        return_activations=True,
    )
    per_draw = lambda t: t.unflatten(0, (size, draws))  # noqa: E731
    grads = {n: per_draw(g) for n, g in grads.items()}
    logs = {
        n: {
            **{k: per_draw(v)[:, 0] for k, v in log.items() if k != "backprops"},
            "backprops": per_draw(log["backprops"]),
        }
        for n, log in logs.items()
    }
    return grads, logs
