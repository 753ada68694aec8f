"""The joint GGN: the Gauss-Newton matrix of all covered layers together, cross-layer blocks
included, in the projected space.

With ``g_n = [vec(G_n,1); …; vec(G_n,L)]`` the concatenation of one sample's projected
gradients over the layers (sorted by name, ``K = Σ_l k_l`` entries), ``C = E_samples[Σ_d g_nd
g_ndᵀ]`` over the exact-Fisher label draws (see :func:`logix_func.fisher_logs`) is the GGN of
the mean loss restricted to the projected directions; a per-layer GGN keeps only its diagonal
blocks. Each layer's state and factors hold its *block row* ``C[l, :]`` ``[k_l, K]``: the rows
sum over batches and ranks like any other state, and the layer names and sizes are the keys
and row counts (no other bookkeeping). ``C`` is ``K²`` floats: for LoGra ranks, where ``K`` is
thousands to tens of thousands.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ekfac import token_logs
from ._raw import kron_cross
from .transform import (
    CurvatureLogs,
    Device,
    Factors,
    JointRowFactors,
    JointRowState,
    State,
    Transform,
    check_counted,
    check_finite,
    checked_logs,
)


def joint_ggn(*, dtype: torch.dtype = torch.float32) -> Transform:
    """The GGN of all layers jointly (cross-layer blocks included), as block rows per layer.

    * ``init(spec, device=None) -> state``: per layer ``{"rows": [k_l, K], "samples": []}``
    * ``update(state, logs) -> state`` with a :class:`CurvatureLogs` whose ``grads`` are
      ``{layer: [B, (D,) k_out, k_in]}`` (the exact-Fisher draws of :func:`fisher_logs` make
      ``C`` the GGN; one sampled draw its Monte-Carlo estimate)
    * ``finalize(state) -> factors``: per layer ``{"rows": C[l, :]}`` ``[k_l, K]``, columns in
      sorted layer order; :func:`~logix_func.preconditioner` solves all layers at once
      through the Cholesky factor of ``C + diag(λ_l)``.
    """

    def init(spec, device: Device = None) -> State[JointRowState]:
        dims = spec.dims()
        total = sum(o * i for o, i in dims.values())
        layers = {
            name: {
                "rows": torch.zeros(o * i, total, dtype=dtype, device=device),
                "samples": torch.zeros((), dtype=dtype, device=device),
            }
            for name, (o, i) in sorted(dims.items())
        }
        return {"spec": spec.tag(), "layers": layers}

    def update(state: State[JointRowState], logs: CurvatureLogs) -> State[JointRowState]:
        grads, logs = checked_logs(state, logs, None)
        names = sorted(state["layers"])
        for name in names:
            g, rows = grads[name], state["layers"][name]["rows"]
            if g.shape[-2] * g.shape[-1] != rows.shape[0]:
                raise ValueError(
                    f"layer {name!r}: gradients [..., {g.shape[-2]}, {g.shape[-1]}] do not match "
                    f"the state's {rows.shape[0]} entries (another spec?)"
                )
        tokens = None if logs is None else {n: token_logs(n, logs[n], grads[n]) for n in names}
        if tokens is not None and all(backs.shape[2] == 1 for _, backs in tokens.values()):
            term = _kronecker_blocks(names, tokens, dtype)
        else:
            flat = []
            for name in names:
                check_finite(grads[name], name, "gradients")
                k = state["layers"][name]["rows"].shape[0]
                flat.append(grads[name].reshape(-1, k).to(dtype))
            joint = torch.cat(flat, dim=1)  # [B·D, K]
            term = joint.T @ joint
        layers, start = {}, 0
        for name in names:
            acc = state["layers"][name]
            stop = start + acc["rows"].shape[0]
            layers[name] = {
                "rows": acc["rows"] + term[start:stop],
                "samples": acc["samples"] + grads[name].shape[0],
            }
            start = stop
        return {"spec": state["spec"], "layers": layers}

    def finalize(state: State[JointRowState]) -> Factors[JointRowFactors]:
        layers = {}
        for name, acc in state["layers"].items():
            check_counted(acc["samples"], name)
            layers[name] = {"rows": acc["rows"] / acc["samples"]}
        return {"spec": state["spec"], "layers": layers}

    return Transform(init, update, finalize)


# the default damping of a joint GGN's layers, × each layer's mean eigenvalue (see Preconditioner)
JOINT_DAMPING = 1.0


def _kronecker_blocks(
    names: list[str], tokens: dict[str, tuple[Tensor, Tensor]], dtype: torch.dtype
) -> Tensor:
    """``Σ_n Σ_d g_nd g_ndᵀ`` ``[K, K]`` from one-token logs, block by block (``g = δ ⊗ a``):
    ``B·K²`` multiply-adds instead of the gradients' ``B·D·K²``; the blocks below the diagonal
    are the transposes of those above."""
    flat = {}
    for name in names:
        acts, backs = tokens[name]
        check_finite(acts, name, "activations")
        check_finite(backs, name, "backprops")
        flat[name] = (acts[:, 0].to(dtype), backs[:, :, 0].to(dtype))
    upper = {
        (a, b): kron_cross(*flat[names[a]], *flat[names[b]])
        for a in range(len(names))
        for b in range(a, len(names))
    }
    return torch.cat(
        [
            torch.cat([upper[(b, a)].T if b < a else upper[(a, b)] for b in range(len(names))], 1)
            for a in range(len(names))
        ]
    )


def joint_layout(rows: dict[str, Tensor]) -> tuple[list[str], list[int]]:
    """The layers in column order (sorted) and their sizes; the rows must span them all."""
    names = sorted(rows)
    sizes = [rows[n].shape[0] for n in names]
    total = sum(sizes)
    for name in names:
        if rows[name].shape[1] != total:
            raise ValueError(
                f"layer {name!r}: joint GGN rows [{rows[name].shape[0]}, {rows[name].shape[1]}] "
                f"do not span the {total} entries of the layers {names}: pass every layer's "
                "factors of one joint fit"
            )
    return names, sizes
