"""The joint GGN in its dual form: the Fisher draws' gradients themselves, solved in sample space.

With ``φ_r = g_r / √N`` the projected gradients of the label draws (``r`` over the ``N``
samples × ``D`` draws of :func:`~logix_func.fisher_logs`, whose exact-Fisher weights are
folded in), the GGN of all layers together is ``G = Σ_r φ_r φ_rᵀ = ΦᵀΦ`` ``[K, K]`` — the
matrix of :func:`~logix_func.curvature.joint_ggn`. Keeping ``Φ`` instead of ``G`` costs
``N·k_in + R·k_out`` floats per one-token layer (``φ_nd = b_nd a_nᵀ``: the sample's
activation and each draw's backprop) or ``R·k_out·k_in`` otherwise, against ``K²``: the
form for full gradients of wide layers, where ``R = N·D`` is far below ``K``. The
preconditioner solves it by the Woodbury identity in the ``R × R`` sample space
(:class:`~logix_func.curvature.DualInverse`)::

    (ΦᵀΦ + Λ)⁻¹ g = Λ⁻¹ (g − Φᵀ S⁻¹ Φ Λ⁻¹ g),   S = I + Φ Λ⁻¹ Φᵀ = I + Σ_l K_l / λ_l,

``Λ`` holding each layer's damping ``λ_l`` on its block, ``K_l = Φ_l Φ_lᵀ`` the layer's
kernel, ``K[nd, me] = (a_n·a_m)(b_nd·b_me)`` for one-token rows.

Its state grows with the data (rows are appended, not summed): :func:`merge_states`
concatenates them, and :func:`~logix_func.distributed.all_reduce_state` gathers them from the
ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ekfac import token_logs
from .transform import (
    CurvatureLogs,
    Device,
    DualRowFactors,
    DualRowState,
    Factors,
    State,
    Transform,
    check_counted,
    check_finite,
    checked_logs,
)


def dual_ggn(*, dtype: torch.dtype = torch.float32) -> Transform:
    """The GGN of all layers jointly, kept as its rows (the dual form of :func:`joint_ggn`).

    * ``init(spec, device=None) -> state``: per layer no rows yet, ``{"row_acts": [0, k_in],
      "row_backs": [0, 0, k_out], "samples": []}``
    * ``update(state, logs) -> state`` with a :class:`CurvatureLogs`: appends the batch's
      ``B·D`` rows, as activations ``[B, k_in]`` and backprops ``[B, D, k_out]`` where every
      sample has one token, else as gradients ``"row_grads"`` ``[B·D, k_out, k_in]`` (earlier
      rows are expanded to them)
    * ``finalize(state) -> factors``: the rows scaled by ``1/√N``, so that ``G = Σ_r φ_r φ_rᵀ``;
      :func:`~logix_func.preconditioner` solves all layers at once in sample space.
    """

    def init(spec, device: Device = None) -> State[DualRowState]:
        def empty(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        layers = {
            name: {"row_acts": empty(0, i), "row_backs": empty(0, 0, o), "samples": empty()}
            for name, (o, i) in sorted(spec.dims().items())
        }
        return {"spec": spec.tag(), "layers": layers}

    def update(state: State[DualRowState], logs: CurvatureLogs) -> State[DualRowState]:
        grads, logs = checked_logs(state, logs, None)
        layers = {}
        for name, acc in state["layers"].items():
            g = grads[name]
            k_out, k_in = row_shape(acc)
            if g.shape[-2:] != (k_out, k_in):
                raise ValueError(
                    f"layer {name!r}: gradients [..., {g.shape[-2]}, {g.shape[-1]}] do not "
                    f"match the state's [{k_out}, {k_in}] (another spec?)"
                )
            check_finite(g, name, "gradients")
            tokens = None if logs is None else token_logs(name, logs[name], g)
            if tokens is not None and tokens[0].shape[1] == 1 and "row_grads" not in acc:
                new = {"row_acts": tokens[0][:, 0], "row_backs": tokens[1][:, :, 0]}
            else:
                acc = dense_rows(acc)
                new = {"row_grads": g.reshape(-1, k_out, k_in)}
            rows = {k: appended(acc[k], v.to(dtype)) for k, v in new.items()}
            layers[name] = {**rows, "samples": acc["samples"] + g.shape[0]}
        return {"spec": state["spec"], "layers": layers}

    def finalize(state: State[DualRowState]) -> Factors[DualRowFactors]:
        layers = {}
        for name, acc in state["layers"].items():
            check_counted(acc["samples"], name)
            scale = acc["samples"].rsqrt()
            if "row_grads" in acc:
                layers[name] = {"row_grads": acc["row_grads"] * scale}
            else:
                layers[name] = {"row_acts": acc["row_acts"], "row_backs": acc["row_backs"] * scale}
        return {"spec": state["spec"], "layers": layers}

    return Transform(init, update, finalize)


ROW_KEYS = ("row_acts", "row_backs", "row_grads")


def is_rows(key: str) -> bool:
    """Whether a state or factor entry holds a dual GGN's rows (appended and gathered, not
    summed)."""
    return key in ROW_KEYS


def appended(rows: Tensor, new: Tensor) -> Tensor:
    """``rows`` then ``new`` along the first axis (an empty ``rows`` may differ in its others)."""
    return torch.cat([rows, new]) if len(rows) else new


def row_shape(rows: DualRowState | DualRowFactors) -> tuple[int, int]:
    """``(k_out, k_in)`` of a layer's rows."""
    if "row_grads" in rows:
        return tuple(rows["row_grads"].shape[1:])
    return rows["row_backs"].shape[-1], rows["row_acts"].shape[1]


def dense_rows(rows: DualRowState) -> DualRowState:
    """One-token rows expanded to gradients ``b_nd a_nᵀ`` ``[N·D, k_out, k_in]``."""
    if "row_grads" in rows:
        return rows
    acts, backs = rows["row_acts"], rows["row_backs"]
    grads = (backs[:, :, :, None] * acts[:, None, None, :]).flatten(0, 1)
    return {"row_grads": grads, "samples": rows["samples"]}
