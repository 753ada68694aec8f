"""The names of the dicts every module passes around, defined once.

- `Params`: ``{name: tensor}``, a model's parameters (or a selection of them).
- `Grads`: ``{name: [batch, *param.shape]}``, per-sample gradients of the parameters.
- `ProjectedGrads`: ``{layer: [*batch, k_out, k_in]}``, LoGra-projected per-sample gradients
  ``P_out G P_inᵀ`` (any leading batch dimensions).
- `Rows`: ``{layer: [n, ...]}``, stored gradient rows, one per example (``[n, k_out, k_in]``
  for LoGra logs).
- `Logs`: ``{layer: {"activations": [B, T, k_in], "backprops": [B, T, k_out]}}``, the
  projected layer inputs and output gradients the curvature estimators read.
- `Spec`: what the estimators and the store read of a projection spec: a `ProjectionSpec`
  (a Protocol here, so this module imports nothing of the package).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from jaxtyping import Float, Int
from torch import Tensor

Params = Mapping[str, Float[Tensor, "..."]]
Grads = dict[str, Float[Tensor, "batch ..."]]
ProjectedGrads = dict[str, Float[Tensor, "*batch k_out k_in"]]
Rows = Mapping[str, Float[Tensor, "n ..."]]
Logs = dict[str, dict[str, Tensor]]


class Spec(Protocol):
    """A projection spec (:class:`~logix_func.ProjectionSpec`): its layers, the shape of
    each layer's projected gradient, its tag and its JSON form."""

    layers: Mapping[str, Any]

    def dims(self) -> dict[str, tuple[int, int]]:
        """``{layer: (k_out, k_in)}``."""
        ...

    def tag(self) -> Int[Tensor, ""]:
        """The int64 tag kept in states and factors."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form."""
        ...


__all__ = ["Grads", "Logs", "Params", "ProjectedGrads", "Rows", "Spec"]
