"""Raw curvature: the full covariance of each layer's flattened (projected) gradients.

LogIX's ``hessian="raw"`` and TRAK's ``XᵀX`` (per layer): ``C = E_samples[vec(G) vec(G)ᵀ]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .kfac import eigh64
from .transform import Transform, check_counted, check_finite, check_layers, layer_dims, spec_tag


def raw(*, dtype: torch.dtype = torch.float32) -> Transform:
    """Gradient covariance per layer.

    * ``init(spec, device=None) -> state``
    * ``update(state, grads) -> state`` with ``grads = {layer: [B, (D,) k_out, k_in]}``
    * ``finalize(state) -> factors``: per layer ``C``, eigenbasis ``Q`` [k, k] and
      ``eigenvalues`` [k], k = k_out·k_in.
    """

    def init(spec: Any, device: torch.device | str | None = None) -> dict[str, Any]:
        layers = {
            name: {
                "C": torch.zeros(k_out * k_in, k_out * k_in, dtype=dtype, device=device),
                "samples": torch.zeros((), dtype=dtype, device=device),
            }
            for name, (k_out, k_in) in layer_dims(spec).items()
        }
        return {"spec": spec_tag(spec), "layers": layers}

    def update(state: dict[str, Any], grads: dict[str, Tensor]) -> dict[str, Any]:
        check_layers(state["layers"], grads, "gradient layers")
        layers = {}
        for name, acc in state["layers"].items():
            g = grads[name]
            k = acc["C"].shape[0]
            if g.shape[-2] * g.shape[-1] != k:
                raise ValueError(
                    f"layer {name!r}: gradients [..., {g.shape[-2]}, {g.shape[-1]}] do not match "
                    f"the state's {k} entries (another spec?)"
                )
            check_finite(g, name, "gradients")
            flat = g.reshape(-1, k).to(dtype)
            layers[name] = {"C": acc["C"] + flat.T @ flat, "samples": acc["samples"] + g.shape[0]}
        return {"spec": state["spec"], "layers": layers}

    def finalize(state: dict[str, Any]) -> dict[str, Any]:
        layers = {}
        for name, acc in state["layers"].items():
            check_counted(acc["samples"], name)
            cov = acc["C"] / acc["samples"]
            values, vectors = eigh64(cov)
            layers[name] = {"C": cov, "Q": vectors, "eigenvalues": values}
        return {"spec": state["spec"], "layers": layers}

    return Transform(init, update, finalize)
