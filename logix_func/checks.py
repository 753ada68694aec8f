"""Checks on the user's model, parameters and vmap failures, with errors that say what to do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn

Randomness = Literal["error", "different", "same"]

_VMAP_ADVICE = (
    "torch.func.vmap could not batch an operation of the model: {msg}\n"
    "What to do: replace the named operation by one that vmap supports (no .item(), no "
    "data-dependent Python control flow, no in-place writes into tensors created outside the "
    "sample, no ops with data-dependent output shapes), or compute that part outside the model."
)


def check_params(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """``params`` must name floating parameters of ``model``."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty {name: Tensor} dict of model parameters")
    known = dict(model.named_parameters())
    unknown = [n for n in params if n not in known]
    if unknown:
        sample = ", ".join(list(known)[:5])
        raise KeyError(
            f"params names not in the model: {unknown} (the model's parameters are e.g. {sample}; "
            "tied parameters appear once, under their first name)"
        )
    for name, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point():
            kind = p.dtype if isinstance(p, Tensor) else type(p).__name__
            raise TypeError(f"parameter {name!r} must be a floating-point tensor, got {kind}")
        if p.shape != known[name].shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(p.shape)}, "
                f"the model's has {tuple(known[name].shape)}"
            )


def check_modes(model: nn.Module, randomness: Randomness) -> None:
    """Refuse modules whose train-mode behaviour would make per-sample results wrong."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"{name or 'model'} is a {type(m).__name__} in training mode: it mixes the samples "
                "of a batch, so per-sample gradients are undefined. Call model.eval() first "
                "(running statistics are then used), or replace it by GroupNorm/LayerNorm."
            )
        dropout = isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        if dropout and randomness == "error":
            raise ValueError(
                f"{name or 'model'} is an active {type(m).__name__} (the model is in training "
                "mode): results would be random. Call model.eval() for deterministic gradients "
                "(the default policy), or pass randomness='different' for an independent dropout "
                "mask per sample ('same' shares one mask)."
            )


def vmap_error(err: RuntimeError) -> RuntimeError:
    """A clearer error for vmap's failures; other errors come back unchanged."""
    msg = str(err)
    if "vmap" not in msg and "Batching rule" not in msg:
        return err
    return RuntimeError(_VMAP_ADVICE.format(msg=msg.strip()))
