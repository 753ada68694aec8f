"""Preconditioners: callables ``grads -> H⁻¹ grads`` built from finalized curvature factors."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from .._origin import factors_provenance
from ..typing import ProjectedGrads
from ._dual import is_rows
from ._joint import JOINT_DAMPING, joint_layout
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
        if not cholesky_in_place(shifted):
            raise ValueError(
                f"layer {self.name!r}: C + λI is not positive definite with damping "
                f"{damping:.3g} (C has zero or negative eigenvalues): pass a larger damping"
            )
        self.cholesky = shifted

    def check(self, damping: float) -> None:
        """Done by :meth:`factorize`."""

    def __call__(self, g: Tensor, damping: float) -> Tensor:
        factor = self.cholesky
        flat = g.reshape(-1, factor.shape[0]).to(factor.dtype)
        return solve_in_place(factor, flat.T).T.reshape(g.shape).to(g.dtype)


class JointInverse:
    """The joint GGN of several layers (block rows ``C[l, :]``,
    :func:`~logix_func.curvature.joint_ggn`): ``g -> (C + diag(λ_l))⁻¹ g`` over the layers'
    concatenated flattened gradients, through one Cholesky factor in float64 (``8 K²``
    bytes; the rows are read in place, the factor overwrites its own copy). Layer ``l``'s
    damping ``λ_l`` shifts its own diagonal block, so without cross-layer blocks this is the
    per-layer GGN; its mean eigenvalue is ``trace(C_ll) / k_l``. The default damping is
    ``JOINT_DAMPING`` × it."""

    def __init__(self, rows: Mapping[str, Tensor]):
        self.rows = dict(rows)
        self.names, self.sizes = joint_layout(self.rows)
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.blocks = {
            n: slice(s, s + k) for n, s, k in zip(self.names, starts, self.sizes, strict=True)
        }

    def mean_eigenvalue(self, name: str) -> float:
        """``trace(C_ll) / k_l`` of one member layer."""
        return self.rows[name][:, self.blocks[name]].diagonal().double().mean().item()

    def factorize(self, damping: Mapping[str, float]) -> None:
        """Lower Cholesky factor of ``C + diag(λ_l)``; a clear error where it is not PD."""
        shifted = torch.cat([self.rows[n].to(torch.float64) for n in self.names])
        for name, block in self.blocks.items():
            shifted.diagonal()[block] += damping[name]
        if not cholesky_in_place(shifted):
            raise ValueError(
                f"layers {self.names}: the joint C + λI is not positive definite with damping "
                f"{ {n: float(f'{damping[n]:.3g}') for n in self.names} } (C has zero or "
                "negative eigenvalues): pass a larger damping"
            )
        self.cholesky = shifted

    def __call__(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``(C + diag(λ_l))⁻¹`` applied to the member layers' ``[*batch, k_out, k_in]``."""
        batch = grads[self.names[0]].shape[:-2]
        flat = [grads[n].reshape(*batch, -1).to(torch.float64) for n in self.names]
        joint = torch.cat(flat, dim=-1).reshape(-1, self.cholesky.shape[0])
        solved = solve_in_place(self.cholesky, joint.T).T.reshape(*batch, -1)
        return {
            n: solved[..., self.blocks[n]].reshape(grads[n].shape).to(grads[n].dtype)
            for n in self.names
        }


class DualInverse:
    """The joint GGN of several layers in its dual form (rows ``φ_r``,
    :func:`~logix_func.curvature.dual_ggn`): ``g -> (ΦᵀΦ + Λ)⁻¹ g = Λ⁻¹ (g − Φᵀ S⁻¹ Φ Λ⁻¹ g)``
    with ``S = I + Σ_l K_l / λ_l`` ``[R, R]`` and ``K_l = Φ_l Φ_lᵀ``, through one Cholesky
    factor of ``S`` in float64 (``8 R²`` bytes; ``S ⪰ I``, and the products with the rows are
    in their own dtype). The same matrix and damping as :class:`JointInverse`, for ``R`` rows
    instead of ``K`` entries; every ``λ_l`` must be > 0 (``Λ⁻¹``). A one-token layer's rows
    ``b_nd a_nᵀ`` share the sample's activation, so ``Φ_l g`` costs ``b·N·k`` multiply-adds
    (``N`` samples), not ``b·R·k``."""

    def __init__(self, rows: Mapping[str, Mapping[str, Tensor]]):
        self.names = sorted(rows)
        self.rows = {n: dict(rows[n]) for n in self.names}
        counts = {n: _row_count(r) for n, r in self.rows.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"dual GGN rows of different counts {counts}: pass every layer's factors of "
                "one dual fit"
            )
        self.count = counts[self.names[0]]

    def mean_eigenvalue(self, name: str) -> float:
        """``trace(G_ll) / k_l = Σ_r ‖φ_rl‖² / k_l``."""
        r = self.rows[name]
        if "row_grads" in r:
            return (r["row_grads"].double().square().sum() / r["row_grads"][0].numel()).item()
        acts, backs = r["row_acts"].double(), r["row_backs"].double()
        total = (acts.square().sum(1) * backs.square().sum((1, 2))).sum()
        return (total / (acts.shape[1] * backs.shape[2])).item()

    def add_kernel(self, s: Tensor, name: str, scale: float) -> None:
        """``s += scale · K_l``, ``K_l = Φ_l Φ_lᵀ`` ``[R, R]``, a block of rows at a time."""
        r = {k: v.to(torch.float64) for k, v in self.rows[name].items()}
        if "row_grads" in r:
            flat = r["row_grads"].flatten(1)
            for block in torch.arange(self.count, device=s.device).split(1024):
                s[block] += (flat[block] @ flat.T).mul_(scale)
            return
        acts, backs = r["row_acts"], r["row_backs"]
        draws = backs.shape[1]
        flat = backs.flatten(0, 1)  # [R, k_out]
        for samples in torch.arange(len(acts), device=s.device).split(max(1, 1024 // draws)):
            block = slice(int(samples[0]) * draws, (int(samples[-1]) + 1) * draws)
            gram = (acts[samples] @ acts.T).repeat_interleave(draws, 0).repeat_interleave(draws, 1)
            s[block] += (flat[block] @ flat.T).mul_(gram).mul_(scale)

    def factorize(self, damping: Mapping[str, float]) -> None:
        """Lower Cholesky factor of ``S``; ``λ_l`` must be > 0."""
        zero = [n for n in self.names if not damping[n] > 0]
        if zero:
            raise ValueError(
                f"layers {zero}: the dual GGN's solve divides by each layer's damping, got "
                f"{ {n: damping[n] for n in zero} }: pass a damping > 0 (or fit "
                "method='joint_ggn', whose Cholesky factor takes λ = 0 where C is definite)"
            )
        self.damping = {n: float(damping[n]) for n in self.names}
        device = next(iter(self.rows[self.names[0]].values())).device
        s = torch.eye(self.count, dtype=torch.float64, device=device)
        for name in self.names:
            self.add_kernel(s, name, 1.0 / self.damping[name])
        if not cholesky_in_place(s):
            raise ValueError(f"layers {self.names}: the dual GGN's I + ΦΛ⁻¹Φᵀ is not definite")
        self.cholesky = s

    def __call__(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``(ΦᵀΦ + Λ)⁻¹`` applied to the member layers' ``[*batch, k_out, k_in]``."""
        dtype = next(iter(self.rows[self.names[0]].values())).dtype
        scaled = {
            n: grads[n].reshape(-1, *grads[n].shape[-2:]).to(dtype) / self.damping[n]
            for n in self.names
        }
        u = sum(_project(self.rows[n], scaled[n]) for n in self.names)  # Φ Λ⁻¹ g  [b, R]
        w = solve_in_place(self.cholesky, u.T.to(torch.float64)).T.to(dtype)
        return {
            n: (scaled[n] - _expand(self.rows[n], w) / self.damping[n])
            .reshape(grads[n].shape)
            .to(grads[n].dtype)
            for n in self.names
        }


def _row_count(rows: Mapping[str, Tensor]) -> int:
    """``R``: rows of one layer's dual factors."""
    if "row_grads" in rows:
        return rows["row_grads"].shape[0]
    return rows["row_backs"].shape[0] * rows["row_backs"].shape[1]


# entries of the [b, k_out, N] intermediate per chunk of the batch (128 MiB in float32)
_CHUNK_ENTRIES = 2**25


def _chunk(acts: Tensor, backs: Tensor) -> int:
    """Batch entries per chunk so that ``[b, k_out, N]`` stays within ``_CHUNK_ENTRIES``."""
    return max(1, _CHUNK_ENTRIES // max(len(acts) * backs.shape[-1], 1))


def _project(rows: Mapping[str, Tensor], g: Tensor) -> Tensor:
    """``Φ_l g`` ``[b, R]``: ``⟨φ_nd, g⟩ = b_ndᵀ g a_n`` for ``g`` ``[b, k_out, k_in]``."""
    if "row_grads" in rows:
        return g.flatten(1) @ rows["row_grads"].flatten(1).T
    acts, backs = rows["row_acts"], rows["row_backs"]
    parts = [
        torch.einsum("bon,ndo->bnd", c @ acts.T, backs).flatten(1)
        for c in g.split(_chunk(acts, backs))
    ]
    return torch.cat(parts)


def _expand(rows: Mapping[str, Tensor], w: Tensor) -> Tensor:
    """``Φ_lᵀ w`` ``[b, k_out, k_in]``: ``Σ_nd w_nd b_nd a_nᵀ`` for ``w`` ``[b, R]``."""
    if "row_grads" in rows:
        grads = rows["row_grads"]
        return (w @ grads.flatten(1)).reshape(-1, *grads.shape[1:])
    acts, backs = rows["row_acts"], rows["row_backs"]
    parts = [
        torch.einsum("bnd,ndo->bon", c.unflatten(1, backs.shape[:2]), backs) @ acts
        for c in w.split(_chunk(acts, backs))
    ]
    return torch.cat(parts)


def cholesky_in_place(m: Tensor) -> bool:
    """Overwrite the symmetric ``m`` with its lower Cholesky factor ``L`` (upper triangle
    zeroed); ``False`` where it is not positive definite. LAPACK works on column-major data:
    factoring the transposed view ``mᵀ`` (the same matrix) as ``UᵀU`` writes ``U = Lᵀ`` in place,
    where a row-major ``m`` would be copied first (another ``8 n²`` bytes)."""
    info = torch.empty((), dtype=torch.int32, device=m.device)
    view = m.mT
    torch.linalg.cholesky_ex(view, upper=True, out=(view, info))
    m.tril_()
    return info.item() == 0


def solve_in_place(factor: Tensor, rhs: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ rhs`` for a lower factor ``L`` (:func:`cholesky_in_place`) by two triangular
    solves, which read ``L`` where it is (``cholesky_solve`` copies an ``n × n`` factor)."""
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


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
        "(QS, QA, eigenvalues), an eigenbasis (Q, eigenvalues), a dense C or joint GGN "
        "rows: pass the "
        "finalized factors of a curvature transform"
    )


class Preconditioner:
    """``(H + λI)⁻¹`` per layer, from KFAC/EKFAC factors (``QA``, ``QS``, ``eigenvalues``
    ``[k_out, k_in]``), raw factors (``Q``, ``eigenvalues`` ``[k]``) or a bare ``C`` ``[k, k]``
    (``raw(eigh=False)``, ``fit_curvature(method="ggn")``), solved through the Cholesky factor
    of ``C + λI``; its mean eigenvalue is ``trace(C) / k``. Each layer's form picks its
    :class:`LayerInverse` (:func:`layer_inverse`), so factors of several forms mix. Layers
    with joint GGN rows (``fit_curvature(method="joint_ggn")``) are solved together by one
    :class:`JointInverse`, those of a dual GGN (``method="dual_ggn"``) by one
    :class:`DualInverse`.

    ``damping``: ``None`` = 0.1 × the mean eigenvalue of *each* layer (``JOINT_DAMPING`` = 1 ×
    it for the layers of a joint GGN, whose cross-layer blocks leave more directions that the
    data barely determine: on the tuning ground truth 1 was best with full gradients and LoGra
    rank 64, 0.1 ≈ 0.3 lower); a float is absolute
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
        rows = {n: f["rows"] for n, f in self.layers.items() if "rows" in f}
        dual = {n: f for n, f in self.layers.items() if any(is_rows(k) for k in f)}
        if rows and dual:
            raise ValueError(
                f"factors mix joint GGN rows {sorted(rows)} and dual GGN rows {sorted(dual)}: "
                "pass the factors of one fit"
            )
        self.joint = JointInverse(rows) if rows else DualInverse(dual) if dual else None
        rows = rows or dual
        self.inverses = {n: layer_inverse(n, f) for n, f in self.layers.items() if n not in rows}
        if isinstance(damping, Mapping):
            check_layers(self.layers, damping, "damping layers")
            self.damping = {n: float(damping[n]) for n in self.layers}
        elif damping is None:
            self.damping = {n: 0.1 * inv.mean_eigenvalue for n, inv in self.inverses.items()}
            self.damping |= {n: JOINT_DAMPING * self.joint.mean_eigenvalue(n) for n in rows}
            self.damping = {n: self.damping[n] for n in self.layers}
        else:
            self.damping = {n: float(damping) for n in self.layers}
        for name, inverse in self.inverses.items():
            inverse.factorize(self.damping[name])
        if self.joint is not None:
            self.joint.factorize(self.damping)
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
        joint = {} if self.joint is None else self.joint(grads)
        return {
            name: joint[name] if name in joint else self.inverses[name](g, self.damping[name])
            for name, g in grads.items()
        }


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
