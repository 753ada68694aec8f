"""projected_grads: LoGra-projected per-sample gradients from one batched pass, without hooks.

No per-sample gradient is ever formed. The engine (:mod:`logix_func._tap`) runs the model once
with the covered layers' calls tapped: each call's projected input ``P_in a_t`` is recorded, and
the output gradient ``δ_t`` of every sample comes from one backward pass (no weight gradients);
``Σ_t (P_out δ_t)(P_in a_t)ᵀ`` is the projected gradient. It works eagerly, under
``torch.compile(fullgraph=True)`` and inside ``vmap`` / ``grad``.

A weight shared by several projectable modules (tied input and output embeddings) is covered
once, under the spec's layer; every use adds its tokens to that layer's gradient, a use whose
layout is the transpose of the layer's (an ``nn.Linear`` head tied to an ``nn.Embedding``) with
the roles of its inputs and output gradients swapped, so the result is the gradient of the
shared parameter.

Precision: the projected tokens ``P_in a_t`` and ``P_out δ_t`` are computed in the dtype the model
runs in (the weight's, or autocast's); the sum over tokens is taken in float32 or wider
(``promote_types(weight dtype, float32)``, autocast disabled), which is the returned dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import reduce
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ._batch import LossFn, sample_loss
from ._compat import tree_map
from ._projection import ProjectionSpec
from ._tap import Pass, call_mask, covered_layers, prepare, projectors, tied_uses, token_mask
from .layers import Call, backprop_tokens, input_tokens
from .typing import Logs, ProjectedGrads


def projected_grads(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    spec: ProjectionSpec,
    *,
    loss_fn: LossFn | None = None,
    return_activations: bool = False,
    chunk_size: int | None = None,
) -> ProjectedGrads | tuple[ProjectedGrads, Logs]:
    """Projected per-sample gradients ``P_out G_i P_inᵀ`` of the spec's layers.

    Args:
        model: any ``nn.Module``; only called through ``functional_call``, never changed.
        params: ``{name: Tensor}``, values for some of ``model``'s parameters (the others are
            the model's own); they are held fixed.
        batch: ``(inputs, targets)`` or a dict with ``labels`` (see :mod:`logix_func._batch`).
        spec: a :class:`~logix_func._projection.ProjectionSpec` built for this model.
        loss_fn: ``loss_fn(outputs, targets)`` → scalar loss of one sample (batch of one);
            ``None`` = summed cross-entropy (or the model's token loss for dict batches).
        return_activations: also return per-token projected inputs and output gradients.
        chunk_size: samples per pass; bounds peak memory, same results.

    Returns:
        ``{layer: [B, k_out, k_in]}``; with ``return_activations`` a pair ``(grads, logs)``,
        ``logs = {layer: {"activations": [B, T, k_in], "backprops": [B, T, k_out],
        "mask": Bool[B, T]}}`` where padded tokens (``attention_mask`` of a dict batch, for
        layers whose tokens are the sequence) are masked out and zeroed.
    """
    if not isinstance(spec, ProjectionSpec):
        raise TypeError(f"spec must be a ProjectionSpec (from lf.logra), got {type(spec).__name__}")
    mb, weights = prepare(model, params, batch)
    layers = covered_layers(model, spec.layers, {**weights[0], **weights[1]})
    tied = tied_uses(model, layers)
    run = _Reducer(model, mb, weights, spec, layers, sample_loss(model, mb, loss_fn), tied)
    if chunk_size is None:
        return run(mb.tensors, mb.size, return_activations)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    parts = []
    for start in range(0, mb.size, chunk_size):
        rows = slice(start, min(start + chunk_size, mb.size))
        parts.append(run(_rows(mb.tensors, rows), rows.stop - rows.start, return_activations))
    return tree_map(lambda *xs: torch.cat(xs), *parts)


def _rows(tensors: dict[str, Any], rows: slice) -> dict[str, Any]:
    return tree_map(lambda t: t[rows], tensors)


class _Reducer:
    """Projected gradients (and logs) of one (sub-)batch from the engine's tapped calls."""

    def __init__(self, model, mb, weights, spec, layers, loss_of, tied):
        self.layers, self.loss_of = layers, loss_of
        self.mats = projectors(spec, layers)
        # every module whose calls add to a layer's gradient: (layer, swapped roles)
        self.roles = {name: (name, False) for name in layers}
        uses = dict(layers)
        for use, (owner, layout, swapped) in tied.items():
            self.roles[use] = (owner, swapped)
            uses[use] = (layout, layers[owner][1])
            p_out, p_in = self.mats[owner]
            self.mats[use] = (p_in, p_out) if swapped else (p_out, p_in)
        self.layouts = {name: layout for name, (layout, _) in uses.items()}
        self.engine = Pass(model, mb, weights, uses)

    def __call__(self, tensors: dict[str, Any], batch: int, logs: bool) -> Any:
        def record(name: str, call: Call | None, y: Tensor) -> Tensor:
            return input_tokens(self.layouts[name], call, self.mats[name][1], batch)

        deltas, inputs = self.engine.output_grads(tensors, batch, record, self.loss_of)
        mask = token_mask(tensors)
        grads, records = {}, {}
        g_of = {name: [] for name in self.layers}
        v_of = {name: [] for name in self.layers}
        for use, (owner, swapped) in self.roles.items():
            layout, p_out = self.layouts[use], self.mats[use][0]
            g = [backprop_tokens(layout, d, p_out, batch) for d in deltas[use]]
            g_of[owner] += inputs[use] if swapped else g
            v_of[owner] += g if swapped else inputs[use]
        for name, (layer, weight) in self.layers.items():
            g, v = g_of[name], v_of[name]
            acc = torch.promote_types(weight.dtype, torch.float32)
            with torch.autocast(weight.device.type, enabled=False):
                grads[name] = reduce(  # no ``sum``: its ``0 + first`` copies a whole term
                    torch.add,
                    (_token_sum(gc.to(acc), vc.to(acc)) for gc, vc in zip(g, v, strict=True)),
                )
            if logs:
                m = torch.cat([call_mask(layer, mask, vc) for vc in v], dim=1)
                w = m.unsqueeze(-1).to(v[0].dtype)
                records[name] = {
                    "activations": torch.cat(v, dim=1) * w,
                    "backprops": torch.cat(g, dim=1) * w,
                    "mask": m,
                }
        return (grads, records) if logs else grads


def _token_sum(
    g: Float[Tensor, "batch tokens k_out"], v: Float[Tensor, "batch tokens k_in"]
) -> Float[Tensor, "batch k_out k_in"]:
    """``Σ_t g_t v_tᵀ`` per sample; one token is a broadcast product (a batched matmul of
    inner size 1 costs several times more)."""
    if g.shape[1] == 1:
        return g[:, 0, :, None] * v[:, 0, None, :]
    return torch.einsum("btk,btj->bkj", g, v)
