"""EKFAC (George et al. 2018): KFAC's eigenbases with eigenvalues refitted per entry.

``Λ = E_samples[(Q_Sᵀ G Q_A)²]`` replaces KFAC's ``λ_S λ_Aᵀ``; it needs per-sample
gradients computed with the same labels as the KFAC factors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .transform import Transform, check_counted, check_finite, check_layers


def ekfac(kfac_factors: dict[str, Any]) -> Transform:
    """Eigenvalue correction on top of finalized KFAC factors.

    * ``init(device=None) -> state``
    * ``update(state, grads) -> state`` with ``grads = {layer: [B, (D,) k_out, k_in]}``
    * ``finalize(state) -> factors``: KFAC's with ``eigenvalues`` replaced by ``Λ``.
    """
    bases = {n: (f["QS"], f["QA"]) for n, f in kfac_factors["layers"].items()}

    def init(device: torch.device | str | None = None) -> dict[str, Any]:
        layers = {
            name: {
                "squares": torch.zeros(qs.shape[0], qa.shape[0], dtype=qs.dtype, device=device),
                "samples": torch.zeros((), dtype=qs.dtype, device=device),
            }
            for name, (qs, qa) in bases.items()
        }
        return {"spec": kfac_factors["spec"], "layers": layers}

    def update(state: dict[str, Any], grads: dict[str, Tensor]) -> dict[str, Any]:
        check_layers(state["layers"], grads, "gradient layers")
        layers = {}
        for name, acc in state["layers"].items():
            qs, qa = bases[name]
            g = grads[name]
            if g.shape[-2:] != acc["squares"].shape:
                raise ValueError(
                    f"layer {name!r}: gradients [..., {g.shape[-2]}, {g.shape[-1]}] do not match "
                    f"the KFAC factors {tuple(acc['squares'].shape)} (another spec?)"
                )
            check_finite(g, name, "gradients")
            rotated = qs.T @ g.to(qs.dtype) @ qa
            layers[name] = {
                "squares": acc["squares"] + rotated.pow(2).reshape(-1, *rotated.shape[-2:]).sum(0),
                "samples": acc["samples"] + g.shape[0],
            }
        return {"spec": state["spec"], "layers": layers}

    def finalize(state: dict[str, Any]) -> dict[str, Any]:
        layers = {}
        for name, acc in state["layers"].items():
            check_counted(acc["samples"], name)
            layers[name] = {
                **kfac_factors["layers"][name],
                "eigenvalues": acc["squares"] / acc["samples"],
            }
        return {"spec": state["spec"], "layers": layers}

    return Transform(init, update, finalize)
