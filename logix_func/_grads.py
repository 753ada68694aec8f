"""Per-sample gradients through ``torch.func``: ``vmap(grad(loss of one sample))``, no hooks."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._batch import Batch, LossFn, ModelBatch, sample_loss, unsqueeze_sample
from ._checks import (
    Randomness,
    check_buffers,
    check_modes,
    check_options,
    check_params,
    vmap_error,
)
from ._compat import tree_map
from .typing import Grads, Params

Strategy = Literal["auto", "vmap", "loop"]


def split_weights(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The model's parameters not in ``params`` (detached, held fixed) and its buffers."""
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    bufs = dict(model.named_buffers()) if buffers is None else dict(buffers)
    return fixed, bufs


def per_sample_grads(
    model: nn.Module,
    params: Params,
    batch: Batch,
    *,
    loss_fn: LossFn | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    strategy: Strategy = "auto",
) -> Grads:
    """Gradient of each sample's loss with respect to ``params``.

    Args:
        model: any ``nn.Module``; it is called through ``functional_call`` and never changed.
        params: ``{name: Tensor}``, a subset of ``model.named_parameters()``; the others stay
            fixed at the model's values.
        batch: ``(inputs, targets)`` or a dict with ``labels`` (see :mod:`logix_func._batch`);
            every tensor has the batch on its first dimension.
        loss_fn: ``loss_fn(outputs, targets)`` → scalar loss of one sample (batch of one);
            ``None`` = summed cross-entropy (or the model's token loss for dict batches).
        buffers: buffers to use instead of the model's own (names from ``named_buffers``).
        chunk_size: samples per vmap call; bounds peak memory to the output plus one chunk's
            activations and gradients, at some cost in speed.
        randomness: ``"error"`` (default) refuses active dropout, ``"different"`` draws an
            independent mask per sample, ``"same"`` one mask for the batch.
        strategy: ``"vmap"`` batches the samples with ``torch.func.vmap``; ``"loop"`` takes one
            ``torch.func.grad`` per sample (for models whose code branches on tensor values,
            such as Hugging Face attention masks); ``"auto"`` (default) uses vmap and, outside
            ``torch.compile``, falls back to the loop with a warning naming the model's line
            when vmap meets data-dependent control flow.

    Returns:
        ``{name: [batch, *param.shape]}`` for every entry of ``params``.
    """
    check_options(chunk_size, randomness)
    if strategy not in ("auto", "vmap", "loop"):
        raise ValueError(f"strategy must be 'auto', 'vmap' or 'loop', got {strategy!r}")
    check_params(model, params)
    check_buffers(model, buffers)
    check_modes(model, randomness)
    mb = ModelBatch.from_batch(batch)
    fixed, bufs = split_weights(model, params, buffers)
    loss_of = sample_loss(model, mb, loss_fn)

    def one_loss(p: dict[str, Tensor], sample: dict[str, Any]) -> Tensor:
        sample = unsqueeze_sample(sample)
        return loss_of(mb.call(model, (p, fixed, bufs), sample), sample)

    detached = {n: p.detach() for n, p in params.items()}
    grad = torch.func.grad(one_loss)
    if strategy == "loop":
        if randomness == "same":
            raise ValueError(
                "strategy='loop' draws dropout masks per sample; randomness='same' needs vmap"
            )
        return _in_chunks(lambda part: grad(detached, part), mb.tensors, mb.size, 1, squeeze=True)
    per_sample = torch.func.vmap(grad, in_dims=(None, 0), randomness=randomness)
    try:
        if chunk_size is None or chunk_size >= mb.size:
            return per_sample(detached, mb.tensors)
        return _in_chunks(lambda part: per_sample(detached, part), mb.tensors, mb.size, chunk_size)
    except RuntimeError as err:
        error = vmap_error(err)
        if strategy == "vmap" or torch.compiler.is_compiling() or not _data_dependent(err):
            raise error from err
        warnings.warn(
            f"{error.args[0].splitlines()[0]}\nper_sample_grads falls back to one gradient per "
            "sample (pass strategy='loop' to skip the vmap attempt)",
            stacklevel=2,
        )
        return per_sample_grads(
            model,
            params,
            batch,
            loss_fn=loss_fn,
            buffers=buffers,
            randomness=randomness,
            strategy="loop",
        )


def _data_dependent(err: RuntimeError) -> bool:
    """vmap's refusal of ``.item()`` or of Python control flow on a tensor's values."""
    return "data-dependent control flow" in str(err) or ".item()" in str(err)


def _in_chunks(
    fn: Any, tensors: dict[str, Any], size: int, chunk_size: int, squeeze: bool = False
) -> Grads:
    """``fn`` over consecutive chunks of the batch, written into one preallocated output
    (``squeeze``: chunks of one sample each, passed without their batch dimension).

    Peak memory: the output plus one chunk's activations and gradients (``vmap(chunk_size=)``
    keeps every chunk's gradients and concatenates them, twice the output).
    """
    out: Grads = {}
    for start in range(0, size, chunk_size):
        part = tree_map(lambda t, s=start: t[s : s + chunk_size], tensors)
        if squeeze:
            part = tree_map(lambda t: t[0], part)
        for name, g in fn(part).items():
            g = g.unsqueeze(0) if squeeze else g
            if name not in out:
                out[name] = g.new_empty((size, *g.shape[1:]))
            out[name][start : start + chunk_size] = g
    return out
