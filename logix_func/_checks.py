"""Checks on the user's model, parameters and vmap failures, with errors that say what to do."""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Randomness = Literal["error", "different", "same"]

_VMAP_ADVICE = (
    "torch.func.vmap could not batch an operation of the model{where}: {msg}\n"
    "What to do: replace that operation by one that vmap supports (no .item(), no "
    "data-dependent Python control flow, no in-place writes into tensors created outside the "
    "sample, no ops with data-dependent output shapes such as nonzero or boolean masking), or "
    "compute that part outside the model."
)
_RANDOM_ADVICE = (
    "the model draws random numbers while computing per-sample gradients{where} (e.g. "
    "F.dropout(x, training=True) or torch.rand in forward), and randomness='error' (the default) "
    "refuses that: results would be random. Make the forward deterministic (model.eval() and "
    "F.dropout(x, p, training=self.training)), or pass randomness='different' for independent "
    "random draws per sample ('same' shares one draw across the batch).\n(vmap said: {msg})"
)
_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
_DETERMINISTIC = (
    "Gradients of a random forward depend on the draw, and projected_grads, capture, "
    "log_dataset and the curvature fits take no randomness option: make the forward "
    "deterministic — call model.eval(), and draw only in training mode "
    "(F.dropout(x, p, training=self.training), `if self.training: torch.rand(...)`)."
)
# torch functions that always draw random numbers
_RANDOM = {
    torch.bernoulli,
    torch.rand,
    torch.rand_like,
    torch.randn,
    torch.randn_like,
    torch.randint,
    torch.randint_like,
    torch.randperm,
    torch.normal,
    torch.poisson,
    torch.multinomial,
    torch.native_dropout,
    Tensor.bernoulli,
    Tensor.bernoulli_,
    Tensor.uniform_,
    Tensor.normal_,
    Tensor.exponential_,
    Tensor.geometric_,
    Tensor.log_normal_,
    Tensor.cauchy_,
    Tensor.random_,
    Tensor.multinomial,
}
# functions that draw when training: {func: ((p name, position, default), (train name, ...))}
_RANDOM_IF = {
    F.dropout: (("p", 1, 0.5), ("training", 2, True)),
    F.dropout1d: (("p", 1, 0.5), ("training", 2, True)),
    F.dropout2d: (("p", 1, 0.5), ("training", 2, True)),
    F.dropout3d: (("p", 1, 0.5), ("training", 2, True)),
    F.alpha_dropout: (("p", 1, 0.5), ("training", 2, False)),
    F.feature_alpha_dropout: (("p", 1, 0.5), ("training", 2, False)),
    torch.dropout: (("p", 1, None), ("train", 2, None)),
    F.rrelu: (("lower", 1, 1.0 / 8), ("training", 3, False)),
    F.scaled_dot_product_attention: (("dropout_p", 4, 0.0), (None, None, True)),
}


def check_params(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """``params`` must name floating parameters of ``model``, with the model's shapes."""
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


def check_buffers(model: nn.Module, buffers: Mapping[str, Tensor] | None) -> None:
    """``buffers`` (when given) must name buffers of ``model``."""
    if buffers is None:
        return
    known = dict(model.named_buffers())
    unknown = [n for n in buffers if n not in known]
    if unknown:
        raise KeyError(f"buffers names not in the model: {unknown} (its buffers: {list(known)})")


def check_options(chunk_size: int | None, randomness: str) -> None:
    """``chunk_size`` is None or a positive int; ``randomness`` is one of vmap's three."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if randomness not in get_args(Randomness):
        raise ValueError(f"randomness must be one of {get_args(Randomness)}, got {randomness!r}")


def check_modes(model: nn.Module, randomness: Randomness | None) -> None:
    """Refuse modules whose train-mode behaviour would make per-sample results wrong.

    ``randomness=None``: the caller (projected_grads, capture, the curvature passes) has no
    randomness option, so an active dropout is refused with advice that fits it."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or m.running_mean is None
        ):
            state = "in training mode" if m.training else "without running statistics"
            raise ValueError(
                f"{name or 'model'!r} is a {type(m).__name__} {state}: it mixes the samples "
                "of a batch, so per-sample gradients are undefined. Call model.eval() first "
                "(running statistics are then used), or replace it by GroupNorm/LayerNorm."
            )
        dropout = isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        if dropout and randomness is None:
            raise ValueError(
                f"{name or 'model'!r} is an active {type(m).__name__} (the model is in training "
                f"mode): results would be random. {_DETERMINISTIC}"
            )
        if dropout and randomness == "error":
            raise ValueError(
                f"{name or 'model'!r} is an active {type(m).__name__} (the model is in training "
                "mode): results would be random. Call model.eval() for deterministic gradients "
                "(the default policy), or pass randomness='different' for an independent dropout "
                "mask per sample ('same' shares one mask)."
            )


def draws_random(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the torch call ``func(*args, **kwargs)`` draws random numbers."""
    if func in _RANDOM:
        return True
    table = _RANDOM_IF.get(func)
    if table is None:
        return False

    def arg(name: str | None, pos: int | None, default: Any) -> Any:
        if name in kwargs:
            return kwargs[name]
        return args[pos] if pos is not None and pos < len(args) else default

    (p_name, p_pos, p_default), (t_name, t_pos, t_default) = table
    return bool(arg(t_name, t_pos, t_default)) and arg(p_name, p_pos, p_default) != 0


def random_error(func: Any) -> ValueError:
    """The refusal of a random draw inside a forward, naming the call and the model's line."""
    if torch.compiler.is_compiling():  # torch.compile traces this: no names or stack to walk
        return ValueError(f"the forward draws random numbers. {_DETERMINISTIC}")
    name = torch.overrides.resolve_name(func) or getattr(func, "__name__", repr(func))
    frames = _user_frames(traceback.extract_stack())
    at = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    return ValueError(f"the forward draws random numbers ({name}){at}. {_DETERMINISTIC}")


def no_randomness_error(err: RuntimeError) -> Exception:
    """vmap's refusal of a random op, for callers without a randomness option; others unchanged."""
    if "random operation" not in str(err):
        return err
    return ValueError(f"the forward draws random numbers{_user_line(err)}. {_DETERMINISTIC}")


def vmap_error(err: RuntimeError) -> RuntimeError:
    """A clearer error for vmap's failures, naming the model's line; others come back unchanged."""
    msg = str(err).strip()
    if "vmap" not in msg and "Batching rule" not in msg:
        return err
    advice = _RANDOM_ADVICE if "random operation" in msg else _VMAP_ADVICE
    return RuntimeError(advice.format(where=_user_line(err), msg=msg))


def _user_line(err: BaseException) -> str:
    """`` at file:line (code)`` of the innermost traceback frame outside torch and this package."""
    frames = _user_frames(traceback.extract_tb(err.__traceback__))
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({f.line})"


def _user_frames(frames: traceback.StackSummary) -> list[traceback.FrameSummary]:
    """The frames outside torch and this package."""
    return [f for f in frames if not os.path.abspath(f.filename).startswith(_LIBRARY_DIRS)]
