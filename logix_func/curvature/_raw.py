"""Raw curvature: the full covariance of each layer's flattened (projected) gradients.

LogIX's ``hessian="raw"`` and TRAK's ``XᵀX`` (per layer): ``C = E_samples[vec(G) vec(G)ᵀ]``.
Over exact-Fisher gradients (``Σ_c`` over the label draws, see :func:`fisher_logs`) it is the
layer's Gauss-Newton matrix in the projected space.

With one token per sample (MLPs), ``G_d = δ_d aᵀ`` and the sample's term factorises:
``Σ_d vec(G_d) vec(G_d)ᵀ = (Σ_d δ_d δ_dᵀ) ⊗ a aᵀ``, so given the KFAC logs the batch is one
``[k_out², B] @ [B, k_in²]`` product instead of ``[k, B·D] @ [B·D, k]``: D times fewer
multiply-adds.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..typing import Logs, ProjectedGrads, Spec
from ._ekfac import token_logs
from ._kfac import eigh64
from .transform import (
    CurvatureLogs,
    DenseFactors,
    Device,
    EigenFactors,
    Factors,
    RawState,
    Transform,
    check_counted,
    check_finite,
    checked_logs,
)


def raw(*, dtype: torch.dtype = torch.float32, eigh: bool = True) -> Transform:
    """Gradient covariance per layer.

    * ``init(spec, device=None) -> state``
    * ``update(state, logs) -> state`` with a :class:`CurvatureLogs` ``(grads, logs)``:
      ``grads = {layer: [B, (D,) k_out, k_in]}`` and optionally the same batch's logs (as
      :func:`logix_func.fisher_logs` returns them): layers with one token per sample then take
      the Kronecker route (same result up to rounding). The older ``update(state, grads,
      logs=None)`` is the same.
    * ``finalize(state) -> factors``: per layer ``C`` [k, k], k = k_out·k_in, and with ``eigh``
      its eigenbasis ``Q`` [k, k] and ``eigenvalues`` [k]. Without them (an ``O(k³)``
      eigendecomposition saved) :func:`preconditioner` solves with a Cholesky factor instead.
    """

    def init(spec: Spec, device: Device = None) -> RawState:
        layers = {
            name: {
                "C": torch.zeros(k_out * k_in, k_out * k_in, dtype=dtype, device=device),
                "samples": torch.zeros((), dtype=dtype, device=device),
            }
            for name, (k_out, k_in) in spec.dims().items()
        }
        return {"spec": spec.tag(), "layers": layers}

    def update(
        state: RawState, logs: CurvatureLogs | ProjectedGrads, more: Logs | None = None
    ) -> RawState:
        grads, logs = checked_logs(state, logs, more)
        layers = {}
        for name, acc in state["layers"].items():
            g = grads[name]
            k = acc["C"].shape[0]
            if g.shape[-2] * g.shape[-1] != k:
                raise ValueError(
                    f"layer {name!r}: gradients [..., {g.shape[-2]}, {g.shape[-1]}] do not match "
                    f"the state's {k} entries (another spec?)"
                )
            acts, backs = (None, None) if logs is None else token_logs(name, logs[name], g)
            if backs is not None and backs.shape[2] == 1:
                check_finite(acts, name, "activations")
                check_finite(backs, name, "backprops")
                term = _kron_sum(acts[:, 0].to(dtype), backs[:, :, 0].to(dtype))
            else:
                check_finite(g, name, "gradients")
                flat = g.reshape(-1, k).to(dtype)
                term = flat.T @ flat
            layers[name] = {"C": acc["C"] + term, "samples": acc["samples"] + g.shape[0]}
        return {"spec": state["spec"], "layers": layers}

    def finalize(state: RawState) -> Factors[EigenFactors | DenseFactors]:
        layers = {}
        for name, acc in state["layers"].items():
            check_counted(acc["samples"], name)
            cov = acc["C"] / acc["samples"]
            if eigh:
                values, vectors = eigh64(cov)
                layers[name] = {"C": cov, "Q": vectors, "eigenvalues": values}
            else:
                layers[name] = {"C": (cov + cov.T) / 2}
        return {"spec": state["spec"], "layers": layers}

    return Transform(init, update, finalize)


def kron_cross(
    acts: Float[Tensor, "batch i"],
    backs: Float[Tensor, "batch draws o"],
    other_acts: Float[Tensor, "batch j"],
    other_backs: Float[Tensor, "batch draws p"],
) -> Float[Tensor, "oi pj"]:
    """``Σ_n (Σ_d δ_nd δ'_ndᵀ) ⊗ a_n a'_nᵀ``: the block ``Σ_n Σ_d vec(G_nd) vec(G'_nd)ᵀ`` of
    two layers with one token per sample (``G = δ aᵀ``), in row-major ``vec`` order."""
    (o, i), (p, j) = (
        (backs.shape[-1], acts.shape[-1]),
        (other_backs.shape[-1], other_acts.shape[-1]),
    )
    s = torch.einsum("ndo,ndp->nop", backs, other_backs).reshape(len(backs), -1)
    a = torch.einsum("ni,nj->nij", acts, other_acts).reshape(len(acts), -1)
    return (s.T @ a).reshape(o, p, i, j).permute(0, 2, 1, 3).reshape(o * i, p * j)


def _kron_sum(
    activations: Float[Tensor, "batch k_in"], backprops: Float[Tensor, "batch draws k_out"]
) -> Float[Tensor, "k k"]:
    """``Σ_n (Σ_d δ_nd δ_ndᵀ) ⊗ a_n a_nᵀ`` in row-major ``vec`` order, ``k = k_out·k_in``."""
    return kron_cross(activations, backprops, activations, backprops)
