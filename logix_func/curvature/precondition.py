"""Preconditioners: callables ``grads -> H⁻¹ grads`` built from finalized curvature factors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..origin import factors_provenance
from ..typing import ProjectedGrads
from .transform import check_layers


class Preconditioner:
    """``(H + λI)⁻¹`` per layer, from KFAC/EKFAC factors (``QA``, ``QS``, ``eigenvalues``
    ``[k_out, k_in]``), raw factors (``Q``, ``eigenvalues`` ``[k]``) or a bare ``C`` ``[k, k]``
    (``raw(eigh=False)``, ``fit_curvature(method="ggn")``), solved through the Cholesky factor
    of ``C + λI``; its mean eigenvalue is ``trace(C) / k``.

    ``damping``: ``None`` = 0.1 × the mean eigenvalue of *each* layer; a float is absolute
    for every layer; a ``{layer: float}`` dict sets each layer. The factors are never changed, so
    damping does not accumulate across calls. ``.damping`` holds the values used. Damping
    must be finite and ≥ 0. ``.provenance`` is what the factors record (spec tag, weights
    fingerprint, loss; ``None`` where they record none); influence checks it.
    """

    def __init__(self, factors: Mapping[str, Any], damping: float | Mapping[str, float] | None):
        self.spec = factors["spec"]
        self.layers = factors["layers"]
        self.provenance = factors_provenance(factors)
        if isinstance(damping, Mapping):
            check_layers(self.layers, damping, "damping layers")
            self.damping = {n: float(damping[n]) for n in self.layers}
        elif damping is None:
            self.damping = {n: 0.1 * _mean_eigenvalue(f) for n, f in self.layers.items()}
        else:
            self.damping = {n: float(damping) for n in self.layers}
        self._cholesky = {
            n: _cholesky(n, f["C"], self.damping[n])
            for n, f in self.layers.items()
            if "eigenvalues" not in f
        }
        for name, value in self.damping.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"damping of layer {name!r} must be finite and ≥ 0, got {value}: an "
                    "infinite damping scales every score to 0, a NaN one makes them NaN"
                )
        for name, value in self.damping.items():
            if name in self._cholesky:
                continue
            lowest = float(self.layers[name]["eigenvalues"].min())
            if lowest + value > 0:
                continue
            if lowest < 0:
                raise ValueError(
                    f"layer {name!r} has a negative eigenvalue {lowest:.3g} (an indefinite "
                    f"Hessian): damping must exceed {-lowest:.3g} for C + λI to be positive "
                    f"definite, got {value:.3g}"
                )
            raise ValueError(
                f"layer {name!r} has zero eigenvalues: damping must be > 0 to invert it"
            )

    def __call__(self, grads: ProjectedGrads) -> ProjectedGrads:
        check_layers(self.layers, grads, "gradient layers")
        return {name: self._apply(name, g) for name, g in grads.items()}

    def _apply(self, name: str, g: Tensor) -> Tensor:
        f = self.layers[name]
        if name in self._cholesky:
            factor = self._cholesky[name]
            flat = g.reshape(-1, factor.shape[0]).to(factor.dtype)
            return torch.cholesky_solve(flat.T, factor).T.reshape(g.shape).to(g.dtype)
        inverse = 1.0 / (f["eigenvalues"] + self.damping[name])
        if "Q" in f:  # raw: full covariance of the flattened gradient
            q = f["Q"]
            flat = g.reshape(*g.shape[:-2], -1).to(q.dtype)
            out = ((flat @ q) * inverse) @ q.T
            return out.reshape(g.shape).to(g.dtype)
        qs, qa = f["QS"], f["QA"]
        rotated = qs.T @ g.to(qs.dtype) @ qa
        return (qs @ (rotated * inverse) @ qa.T).to(g.dtype)


def _mean_eigenvalue(factors: Mapping[str, Tensor]) -> float:
    if "eigenvalues" in factors:
        return factors["eigenvalues"].mean().item()
    return (factors["C"].diagonal().mean()).item()


def _cholesky(name: str, c: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of ``C + λI`` in float64; a clear error where it is not PD."""
    shifted = c.to(torch.float64, copy=True)
    shifted.diagonal().add_(damping)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if info.item() != 0:
        raise ValueError(
            f"layer {name!r}: C + λI is not positive definite with damping {damping:.3g} "
            "(C has zero or negative eigenvalues): pass a larger damping"
        )
    return factor


def preconditioner(
    factors: Mapping[str, Any] | None, damping: float | Mapping[str, float] | None = None
) -> Preconditioner | IdentityPreconditioner:
    """A callable ``grads -> (H + λI)⁻¹ grads``; ``factors=None`` gives the identity."""
    if factors is None:
        return IdentityPreconditioner()
    return Preconditioner(factors, damping)


class IdentityPreconditioner:
    """Leaves gradients as they are (plain gradient dot products)."""

    spec = None
    provenance = None
    damping: dict[str, float] = {}

    def __call__(self, grads: ProjectedGrads) -> ProjectedGrads:
        return dict(grads)
