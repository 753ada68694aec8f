"""The optax-style triple every curvature estimator returns, and the spec tag of a state."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Transform(NamedTuple):
    """``init(...) -> state``, ``update(state, logs) -> state``, ``finalize(state) -> factors``."""

    init: Callable[..., dict[str, Any]]
    update: Callable[..., dict[str, Any]]
    finalize: Callable[[dict[str, Any]], dict[str, Any]]


def spec_tag(spec: Any) -> Tensor:
    """A 63-bit int64 tag of a projection spec, kept in states to refuse mixing specs."""
    payload = spec.to_dict() if hasattr(spec, "to_dict") else spec
    digest = hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).digest()
    return torch.tensor(int.from_bytes(digest, "little") >> 1, dtype=torch.int64)


def layer_dims(spec: Any) -> dict[str, tuple[int, int]]:
    """``{layer: (k_out, k_in)}``: the shape of each layer's projected gradient."""
    return {name: (layer.rank_out, layer.rank_in) for name, layer in spec.layers.items()}


def check_layers(expected: dict[str, Any], got: dict[str, Any], what: str) -> None:
    """``got`` must cover exactly the layers of ``expected``."""
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ValueError(
            f"{what} do not match the curvature state's layers: missing {missing}, "
            f"unexpected {extra}"
        )


def check_finite(x: Tensor, layer: str, what: str) -> None:
    """Refuse NaN or inf values, naming the layer and the samples (skipped when compiled)."""
    # a sum is finite only if every term is: one reduction on the common path
    if torch.compiler.is_compiling() or torch.isfinite(x.sum()):
        return
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"non-finite {what} in layer {layer!r} for samples at batch positions {rows[:10]}"
            f"{' …' if len(rows) > 10 else ''}: check the loss and inputs of those samples"
        )


def check_counted(samples: Tensor, layer: str) -> None:
    """Finalizing needs at least one accumulated sample per layer."""
    if samples == 0:
        raise ValueError(f"layer {layer!r}: no samples were accumulated")
