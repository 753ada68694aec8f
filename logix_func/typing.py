"""The names of the dicts every module passes around, defined once.

- `Params`: ``{name: tensor}``, a model's parameters (or a selection of them).
- `Grads`: ``{name: [batch, *param.shape]}``, per-sample gradients of the parameters.
- `ProjectedGrads`: ``{layer: [*batch, k_out, k_in]}``, LoGra-projected per-sample gradients
  ``P_out G P_inᵀ`` (any leading batch dimensions).
- `Rows`: ``{layer: [n, ...]}``, stored gradient rows, one per example (``[n, k_out, k_in]``
  for LoGra logs).
- `Logs`: ``{layer: {"activations": [B, T, k_in], "backprops": [B, T, k_out]}}``, the
  projected layer inputs and output gradients the curvature estimators read.
- `Spec`: a `ProjectionSpec`, the projection a run used.
"""

from __future__ import annotations

from collections.abc import Mapping

from jaxtyping import Float
from torch import Tensor

from .projection import ProjectionSpec

Params = Mapping[str, Float[Tensor, "..."]]
Grads = dict[str, Float[Tensor, "batch ..."]]
ProjectedGrads = dict[str, Float[Tensor, "*batch k_out k_in"]]
Rows = Mapping[str, Float[Tensor, "n ..."]]
Logs = dict[str, dict[str, Tensor]]
Spec = ProjectionSpec

__all__ = ["Grads", "Logs", "Params", "ProjectedGrads", "Rows", "Spec"]
