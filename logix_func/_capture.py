"""capture: per-sample inputs, outputs and output gradients of layers, and watched tensors.

LogIX's ``forward`` / ``backward`` logs and ``watch_activation`` as one pure function, a reducer
over the engine of :func:`~logix_func.projected_grads` (:mod:`logix_func._tap`). The model is
only called through ``functional_call``: a covered layer's ``F.linear`` / ``conv`` /
``F.embedding`` call is recognised by its weight, its input and output are recorded, and a zero
tensor ``e`` added to its output gives the output gradient ``δ = ∂(Σ_i loss_i)/∂e`` of every
sample at once (samples do not interact in the batched pass). A forward that calls
:func:`~logix_func._watch.watch` exposes any other tensor the same way.

Everything is seen in the token view of :mod:`logix_func.layers`, the view in which a layer's
gradient is ``Σ_t δ_t a_tᵀ``:

* ``inputs``: ``a_t`` ``[B, T, in]`` (conv: unfolded patches, embedding: one-hot rows); with a
  projection ``P_in [a_t; 1]`` ``[B, T, k_in]`` (the spec's ``P_in`` covers the bias column);
* ``outputs`` / ``output_grads``: ``y_t`` / ``δ_t`` ``[B, T, out]``, projected ``P_out y_t`` /
  ``P_out δ_t`` ``[B, T, k_out]``;
* watched tensors ``[B, *tokens, features]``: ``[B, T, features]``, never projected.

Tokens are then summed (``reduce="sum"``), averaged over the valid ones (``"mean"``) or kept
(``None``, with ``"mask" [B, T]``: ``attention_mask`` where the tokens are the sequence; masked
tokens are zeroed). A layer called several times has the tokens of all its calls.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ._batch import LossFn, sample_loss
from ._projection import ProjectionSpec
from ._tap import Pass, call_mask, covered_layers, prepare, projectors, token_mask
from .layers import Call, LayerSpec, backprop_tokens, input_tokens, projectable_layers

KINDS = ("inputs", "outputs", "output_grads")
Reduce = Literal["sum", "mean"] | None
Captured = dict[str, dict[str, Float[Tensor, "batch ..."]]]


def capture(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    layers: Collection[str] | None = None,
    what: Collection[str] = KINDS,
    reduce: Reduce = "sum",
    project: ProjectionSpec | None = None,
    watch: Collection[str] | bool | None = None,
    loss_fn: LossFn | None = None,
) -> Captured:
    """Per-sample ``inputs`` / ``outputs`` / ``output_grads`` of layers and watched tensors.

    Args:
        model: any ``nn.Module``; only called through ``functional_call``, never changed.
        params: ``{name: Tensor}`` values for some of the model's parameters (held fixed).
        batch: ``(inputs, targets)`` or a dict with ``labels`` (see :mod:`logix_func._batch`).
        layers: module names (projectable ones: Linear, Conv1d/2d, Embedding, transformers'
            Conv1D, the in_proj of MultiheadAttention); ``None`` = the spec's layers, or every
            projectable module. ``[]`` for watched tensors only.
        what: any of ``"inputs"``, ``"outputs"``, ``"output_grads"`` (watched tensors have
            outputs and output_grads). Without ``"output_grads"`` there is no backward pass.
        reduce: ``"sum"`` or ``"mean"`` over tokens, or ``None`` to keep them (module docstring).
        project: a :class:`~logix_func._projection.ProjectionSpec` covering ``layers``.
        watch: names of :func:`~logix_func._watch.watch` calls to record, ``True`` for all.
        loss_fn: as in :func:`~logix_func.projected_grads` (only used for ``output_grads``).

    Returns:
        ``{name: {kind: [B, k]}}`` (``reduce`` given) or ``{name: {kind: [B, T, k], "mask":
        Bool[B, T]}}`` (``reduce=None``), for each layer and watched name.
    """
    kinds = _check_what(what)
    if reduce not in ("sum", "mean", None):
        raise ValueError(f"reduce must be 'sum', 'mean' or None, got {reduce!r}")
    mb, weights = prepare(model, params, batch)
    chosen = _chosen_layers(model, layers, project)
    covered = covered_layers(model, chosen, {**weights[0], **weights[1]})
    mats = dict.fromkeys(covered, (None, None)) if project is None else projectors(project, covered)
    watched = _check_watch(watch, covered)
    if watched and "outputs" not in kinds and "output_grads" not in kinds:
        raise ValueError("watched tensors have outputs and output_grads only; add one to what")

    def record(name: str, call: Call | None, y: Tensor) -> tuple[Tensor, ...]:
        """``(output,)`` or ``(output, inputs)``: aux of torch.func.grad, tensors only."""
        if call is None or "inputs" not in kinds:
            return (y.detach(),)
        layer = covered[name][0]
        if project is None:  # raw inputs: no bias column
            layer = replace(layer, bias=None, rank_in=layer.in_features)
        return y.detach(), input_tokens(layer, call, mats[name][1], mb.size)

    engine = Pass(model, mb, weights, covered, watched)
    if "output_grads" in kinds:
        deltas, seen = engine.output_grads(
            mb.tensors, mb.size, record, sample_loss(model, mb, loss_fn)
        )
    else:
        with torch.no_grad():
            _, seen = engine.forward(mb.tensors, mb.size, record)
        deltas = {name: [None] * len(calls) for name, calls in seen.items()}
    records = {
        name: [(*_split(r), d) for r, d in zip(calls, deltas[name], strict=True)]
        for name, calls in seen.items()
    }
    mask = token_mask(mb.tensors)
    out = {}
    for name, (layer, _) in covered.items():
        p_out = mats[name][0]
        calls = records[name]
        tokens = {"outputs": [backprop_tokens(layer, y, p_out, mb.size) for _, y, _ in calls]}
        if "inputs" in kinds:
            tokens["inputs"] = [v for v, _, _ in calls]
        if "output_grads" in kinds:
            tokens["output_grads"] = [backprop_tokens(layer, d, p_out, mb.size) for *_, d in calls]
        masks = [call_mask(layer, mask, v) for v in tokens["outputs"]]
        out[name] = _reduced({k: tokens[k] for k in kinds}, masks, reduce)
    if watched is True:
        watched = [name for name in records if name not in covered]
    for name in watched:
        if name not in records:
            raise ValueError(f"watched tensor {name!r} was never passed to watch() in the forward")
        _, y, d = records[name][0]
        tokens = {"outputs": [_watch_tokens(y)]}
        if "output_grads" in kinds:
            tokens["output_grads"] = [_watch_tokens(d)]
        sequence = mask is not None and tokens["outputs"][0].shape[1] == mask.shape[1]
        masks = [mask if sequence else _all_tokens(tokens["outputs"][0])]
        out[name] = _reduced({k: v for k, v in tokens.items() if k in kinds}, masks, reduce)
    return out


def _check_what(what: Collection[str]) -> tuple[str, ...]:
    if isinstance(what, str):
        what = (what,)
    unknown = sorted(set(what) - set(KINDS))
    if unknown or not what:
        raise ValueError(f"what must be a non-empty subset of {KINDS}, got {tuple(what)!r}")
    return tuple(k for k in KINDS if k in what)


def _chosen_layers(
    model: nn.Module, layers: Collection[str] | None, project: ProjectionSpec | None
) -> dict[str, LayerSpec]:
    """The layers to capture, with the spec's ranks (full ranks without a projection)."""
    if project is not None:
        if not isinstance(project, ProjectionSpec):
            raise TypeError(f"project must be a ProjectionSpec, got {type(project).__name__}")
        names = list(project.layers) if layers is None else list(layers)
        missing = [n for n in names if n not in project.layers]
        if missing:
            raise KeyError(
                f"layers {missing} are not in the projection spec {list(project.layers)}"
            )
        return {n: project.layers[n] for n in names}
    found = projectable_layers(model)
    names = list(found) if layers is None else list(layers)
    missing = [n for n in names if n not in found]
    if missing:
        raise KeyError(
            f"layers {missing} are not projectable modules of {type(model).__name__}; "
            f"capture covers {sorted(found)}"
        )
    return {n: found[n] for n in names}


def _check_watch(watch: Collection[str] | bool | None, covered: dict) -> Collection[str] | bool:
    if watch is None or watch is False:
        return ()
    if watch is True:
        return True
    names = [watch] if isinstance(watch, str) else list(watch)
    clash = sorted(set(names) & set(covered))
    if clash:
        raise ValueError(f"watched names {clash} are also captured layers; rename them")
    return names


def _watch_tokens(t: Tensor) -> Tensor:
    """``[B, *tokens, features]`` → ``[B, T, features]`` (``[B]`` → ``[B, 1, 1]``)."""
    return t.reshape(t.shape[0], -1, t.shape[-1] if t.dim() > 1 else 1)


def _all_tokens(v: Tensor) -> Tensor:
    return torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)


def _reduced(tokens: dict[str, list[Tensor]], masks: list[Tensor], reduce: Reduce) -> dict:
    m = torch.cat(masks, dim=1)
    out = {}
    for kind, parts in tokens.items():
        v = torch.cat(parts, dim=1)
        w = m.unsqueeze(-1).to(v.dtype)
        if reduce is None:
            out[kind] = v * w
        elif reduce == "sum":
            out[kind] = (v * w).sum(1)
        else:
            out[kind] = (v * w).sum(1) / w.sum(1).clamp_min(1)
    if reduce is None:
        out["mask"] = m
    return out


def _split(record: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor]:
    """A recorded ``(output,)`` or ``(output, inputs)`` as ``(inputs or None, output)``."""
    return (record[1] if len(record) > 1 else None), record[0]


def flatten_capture(captured: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``{name: {kind: [B, ...]}}`` → ``{"name.kind": [B, ...]}``, rows for a LogStore (masks
    become 0/1 floats, exact in every store dtype)."""
    flat = {}
    for name, kinds in captured.items():
        for kind, t in kinds.items():
            flat[f"{name}.{kind}"] = t.to(torch.get_default_dtype()) if t.dtype == torch.bool else t
    return flat


def unflatten_capture(rows: Mapping[str, Tensor]) -> Captured:
    """Inverse of :func:`flatten_capture` (``"mask"`` entries back to bool). Other entries
    (gradient layers of the same store) are left out."""
    out: Captured = {}
    for key, t in rows.items():
        name, _, kind = key.rpartition(".")
        if name and kind in (*KINDS, "mask"):
            out.setdefault(name, {})[kind] = t.bool() if kind == "mask" else t
    return out


def capture_shapes(captured: Mapping[str, Mapping[str, Tensor]]) -> dict[str, tuple[int, ...]]:
    """Row shapes ``{"name.kind": shape}`` of a capture, for a :class:`StoreSchema`."""
    return {key: tuple(t.shape[1:]) for key, t in flatten_capture(captured).items()}
