"""Preconditioners: callables ``grads -> H⁻¹ grads`` built from finalized curvature factors."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from .._origin import factors_provenance
from ..typing import ProjectedGrads
from .transform import CurvatureFactors, check_layers


class LayerInverse(ABC):
    """``g -> (H + λI)⁻¹ g`` for one layer, one subclass per form of its factors.

    ``mean_eigenvalue`` gives the default damping; ``factorize(λ)`` does the work that needs
    the damping before it is validated (a Cholesky factor), ``check(λ)`` refuses a damping
    that leaves ``H + λI`` singular, and ``__call__(g, λ)`` applies the inverse to ``g``
    ``[*batch, k_out, k_in]``.
    """

    def __init__(self, name: str, factors: Mapping[str, Tensor]):
        self.name, self.factors = name, factors

    @property
    def mean_eigenvalue(self) -> float:
        """``trace(H) / k``."""
        return self.factors["eigenvalues"].mean().item()

    def factorize(self, damping: float) -> None:
        """Prepare the inverse for ``damping`` (nothing to do for an eigenbasis)."""
        return None

    def check(self, damping: float) -> None:
        """``H + λI`` must be positive definite: its lowest eigenvalue plus ``λ`` above 0."""
        lowest = float(self.factors["eigenvalues"].min())
        if lowest + damping > 0:
            return
        if lowest < 0:
            raise ValueError(
                f"layer {self.name!r} has a negative eigenvalue {lowest:.3g} (an indefinite "
                f"Hessian): damping must exceed {-lowest:.3g} for C + λI to be positive "
                f"definite, got {damping:.3g}"
            )
        raise ValueError(
            f"layer {self.name!r} has zero eigenvalues: damping must be > 0 to invert it"
        )

    @abstractmethod
    def __call__(self, g: Tensor, damping: float) -> Tensor:
        """``(H + λI)⁻¹ g`` for ``g`` ``[*batch, k_out, k_in]``."""


class KroneckerEigenInverse(LayerInverse):
    """KFAC/EKFAC: ``(Q_S ⊗ Q_A) diag(1 / (Λ + λ)) (Q_S ⊗ Q_A)ᵀ``, ``Λ`` ``[k_out, k_in]``."""

    def __call__(self, g: Tensor, damping: float) -> Tensor:
        qs, qa = self.factors["QS"], self.factors["QA"]
        inverse = 1.0 / (self.factors["eigenvalues"] + damping)
        rotated = qs.T @ g.to(qs.dtype) @ qa
        return (qs @ (rotated * inverse) @ qa.T).to(g.dtype)


class EigenInverse(LayerInverse):
    """Raw or exact: ``Q diag(1 / (λ_C + λ)) Qᵀ`` over the flattened gradient, ``Q`` ``[k, k]``."""

    def __call__(self, g: Tensor, damping: float) -> Tensor:
        q = self.factors["Q"]
        inverse = 1.0 / (self.factors["eigenvalues"] + damping)
        flat = g.reshape(*g.shape[:-2], -1).to(q.dtype)
        out = ((flat @ q) * inverse) @ q.T
        return out.reshape(g.shape).to(g.dtype)


class CholeskyInverse(LayerInverse):
    """A bare ``C`` ``[k, k]`` (``raw(eigh=False)``, the GGN): solved through the Cholesky
    factor of ``C + λI``; the mean eigenvalue is ``trace(C) / k``."""

    @property
    def mean_eigenvalue(self) -> float:
        return self.factors["C"].diagonal().mean().item()

    def factorize(self, damping: float) -> None:
        """Lower Cholesky factor of ``C + λI`` in float64; a clear error where it is not PD."""
        shifted = self.factors["C"].to(torch.float64, copy=True)
        shifted.diagonal().add_(damping)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if info.item() != 0:
            raise ValueError(
                f"layer {self.name!r}: C + λI is not positive definite with damping "
                f"{damping:.3g} (C has zero or negative eigenvalues): pass a larger damping"
            )
        self.cholesky = factor

    def check(self, damping: float) -> None:
        """Done by :meth:`factorize`."""

    def __call__(self, g: Tensor, damping: float) -> Tensor:
        factor = self.cholesky
        flat = g.reshape(-1, factor.shape[0]).to(factor.dtype)
        return torch.cholesky_solve(flat.T, factor).T.reshape(g.shape).to(g.dtype)


def layer_inverse(name: str, factors: Mapping[str, Tensor]) -> LayerInverse:
    """The :class:`LayerInverse` of one layer's factors, by their form."""
    if {"QS", "QA", "eigenvalues"} <= factors.keys():
        return KroneckerEigenInverse(name, factors)
    if {"Q", "eigenvalues"} <= factors.keys():
        return EigenInverse(name, factors)
    if "C" in factors:
        return CholeskyInverse(name, factors)
    raise ValueError(
        f"layer {name!r}: factors with entries {sorted(factors)} are none of KFAC/EKFAC's "
        "(QS, QA, eigenvalues), an eigenbasis (Q, eigenvalues) or a dense C: pass the "
        "finalized factors of a curvature transform"
    )


class Preconditioner:
    """``(H + λI)⁻¹`` per layer, from KFAC/EKFAC factors (``QA``, ``QS``, ``eigenvalues``
    ``[k_out, k_in]``), raw factors (``Q``, ``eigenvalues`` ``[k]``) or a bare ``C`` ``[k, k]``
    (``raw(eigh=False)``, ``fit_curvature(method="ggn")``), solved through the Cholesky factor
    of ``C + λI``; its mean eigenvalue is ``trace(C) / k``. Each layer's form picks its
    :class:`LayerInverse` (:func:`layer_inverse`), so factors of several forms mix.

    ``damping``: ``None`` = 0.1 × the mean eigenvalue of *each* layer; a float is absolute
    for every layer; a ``{layer: float}`` dict sets each layer. The factors are never changed, so
    damping does not accumulate across calls. ``.damping`` holds the values used. Damping
    must be finite and ≥ 0. ``.provenance`` is what the factors record (spec tag, weights
    fingerprint, loss; ``None`` where they record none); influence checks it.
    """

    def __init__(
        self, factors: CurvatureFactors, damping: float | Mapping[str, float] | None
    ) -> None:
        self.spec = factors["spec"]
        self.layers = factors["layers"]
        self.provenance = factors_provenance(factors)
        self.inverses = {n: layer_inverse(n, f) for n, f in self.layers.items()}
        if isinstance(damping, Mapping):
            check_layers(self.layers, damping, "damping layers")
            self.damping = {n: float(damping[n]) for n in self.layers}
        elif damping is None:
            self.damping = {n: 0.1 * inv.mean_eigenvalue for n, inv in self.inverses.items()}
        else:
            self.damping = {n: float(damping) for n in self.layers}
        for name, inverse in self.inverses.items():
            inverse.factorize(self.damping[name])
        for name, value in self.damping.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"damping of layer {name!r} must be finite and ≥ 0, got {value}: an "
                    "infinite damping scales every score to 0, a NaN one makes them NaN"
                )
        for name, inverse in self.inverses.items():
            inverse.check(self.damping[name])

    def __call__(self, grads: ProjectedGrads) -> ProjectedGrads:
        check_layers(self.layers, grads, "gradient layers")
        return {name: self.inverses[name](g, self.damping[name]) for name, g in grads.items()}


def preconditioner(
    factors: CurvatureFactors | None,
    damping: float | Mapping[str, float] | None = None,
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
