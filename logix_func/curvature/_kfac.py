"""KFAC: per layer A = E[a aᵀ] over tokens and S = E[Σ_tokens δ δᵀ] over samples.

For a layer whose per-sample gradient is ``G = Σ_t δ_t a_tᵀ`` (projected: ``P_out δ``,
``P_in a``), the Fisher block of the *mean* training loss is approximated by ``A ⊗ S``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..typing import Logs, Spec
from .transform import (
    CurvatureLogs,
    Device,
    Factors,
    KfacState,
    KroneckerFactors,
    Transform,
    check_counted,
    check_finite,
    check_layers,
    kfac_logs,
)

Fisher = Literal["auto", "true", "empirical", "exact"]
FISHERS = ("auto", "true", "empirical", "exact")


def eigh64(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD matrix, in float64."""
    m = matrix.double()
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


def kfac(fisher: Fisher = "auto", *, dtype: torch.dtype = torch.float32) -> Transform:
    """KFAC factors as an init/update/finalize transform.

    ``fisher`` records which labels the logs must be computed with (see
    :func:`logix_func.fisher_logs`): ``"true"`` samples them from the model (Kronfluence's
    default), ``"empirical"`` uses the data's (LogIX's), ``"exact"`` takes the expectation over
    every label, ``"auto"`` the expectation where it is cheap and a sample elsewhere. The
    transform itself accumulates whatever logs it is given.

    * ``init(spec, device=None) -> state``
    * ``update(state, logs) -> state`` reads ``logs.logs`` of a :class:`CurvatureLogs` (or
      takes them bare): ``{layer: {"activations": [B, T, k_in], "backprops": [B, (D,) T,
      k_out], "mask": [B, T]}}`` (D label draws, optional)
    * ``finalize(state) -> factors``: per layer ``A``, ``S``, eigenbases ``QA``, ``QS`` and
      ``eigenvalues = λ_S λ_Aᵀ`` of shape ``[k_out, k_in]``.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")

    def init(spec: Spec, device: Device = None) -> KfacState:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        layers = {
            name: {
                "A": zeros(k_in, k_in),
                "S": zeros(k_out, k_out),
                "tokens": zeros(),
                "samples": zeros(),
            }
            for name, (k_out, k_in) in spec.dims().items()
        }
        return {"spec": spec.tag(), "layers": layers}

    def update(state: KfacState, logs: CurvatureLogs | Logs) -> KfacState:
        logs = kfac_logs(logs)
        check_layers(state["layers"], logs, "logged layers")
        layers = {}
        for name, acc in state["layers"].items():
            log = logs[name]
            acts, backs = log["activations"], log["backprops"]
            k_in, k_out = acc["A"].shape[0], acc["S"].shape[0]
            if acts.shape[-1] != k_in or backs.shape[-1] != k_out:
                raise ValueError(
                    f"layer {name!r}: logs have activations [..., {acts.shape[-1]}] and backprops "
                    f"[..., {backs.shape[-1]}], the state expects "
                    f"{k_in} and {k_out} (another spec?)"
                )
            check_finite(acts, name, "activations")
            check_finite(backs, name, "backprops")
            a = acts.reshape(-1, k_in).to(dtype)
            d = backs.reshape(-1, k_out).to(dtype)
            layers[name] = {
                "A": acc["A"] + a.T @ a,
                "S": acc["S"] + d.T @ d,
                "tokens": acc["tokens"] + log["mask"].sum().to(dtype),
                "samples": acc["samples"] + acts.shape[0],
            }
        return {"spec": state["spec"], "layers": layers}

    def finalize(state: KfacState) -> Factors[KroneckerFactors]:
        factors = {}
        for name, acc in state["layers"].items():
            check_counted(acc["samples"], name)
            a_cov = acc["A"] / acc["tokens"].clamp_min(1)
            s_cov = acc["S"] / acc["samples"]
            la, qa = eigh64(a_cov)
            ls, qs = eigh64(s_cov)
            factors[name] = {
                "A": a_cov,
                "S": s_cov,
                "QA": qa,
                "QS": qs,
                "eigenvalues": torch.outer(ls, la),
            }
        return {"spec": state["spec"], "layers": factors}

    return Transform(init, update, finalize)
