"""EKFAC (George et al. 2018): KFAC's eigenbases with eigenvalues refitted per entry.

``Λ = E_samples[(Q_Sᵀ G Q_A)²]`` replaces KFAC's ``λ_S λ_Aᵀ``; it needs per-sample
gradients under the same Fisher as the KFAC factors. Where labels are sampled, draw them
afresh (other seeds): eigenvalues measured on the very draws the eigenbases were fitted to are
biased towards that sample's noise.

With ``G = Σ_t δ_t a_tᵀ`` the rotation can also be taken token by token:
``Q_Sᵀ G Q_A = Σ_t (Q_Sᵀ δ_t)(Q_Aᵀ a_t)ᵀ``. Given the KFAC logs, each layer takes whichever
route costs fewer multiply-adds; for one token per sample (MLPs) the square factorises and
the whole batch is one ``[k_out, B] @ [B, k_in]`` product.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..typing import Logs, ProjectedGrads, Spec
from .transform import (
    CurvatureLogs,
    Device,
    EkfacState,
    Factors,
    KroneckerFactors,
    Transform,
    check_counted,
    check_finite,
    checked_logs,
)


def ekfac(kfac_factors: Factors[KroneckerFactors]) -> Transform:
    """Eigenvalue correction on top of finalized KFAC factors.

    * ``init(spec, device=None) -> state``: ``spec`` must be the KFAC factors' (its tag is
      checked); the older ``init(device=None)`` skips that check.
    * ``update(state, logs) -> state`` with a :class:`CurvatureLogs` ``(grads, logs)``:
      ``grads = {layer: [B, (D,) k_out, k_in]}`` and optionally the same batch's logs
      ``{layer: {"activations": [B, T, k_in], "backprops": [B, (D,) T, k_out], ...}}``
      (padded tokens zeroed), as :func:`logix_func.fisher_logs` returns them: a layer is then
      rotated token by token where that is cheaper (same result up to rounding). The older
      ``update(state, grads, logs=None)`` is the same.
    * ``finalize(state) -> factors``: KFAC's with ``eigenvalues`` replaced by ``Λ``.
    """
    bases = {n: (f["QS"], f["QA"]) for n, f in kfac_factors["layers"].items()}

    def init(spec: Spec | Device = None, device: Device = None) -> EkfacState:
        if spec is None or isinstance(spec, str | torch.device):  # the older init(device)
            spec, device = None, spec if spec is not None else device
        if spec is not None and not torch.equal(spec.tag(), kfac_factors["spec"]):
            raise ValueError(
                f"ekfac: the spec's tag {int(spec.tag()):016x} differs from the KFAC factors' "
                f"{int(kfac_factors['spec']):016x}: pass the spec the KFAC factors were fitted "
                "with"
            )
        layers = {
            name: {
                "squares": torch.zeros(qs.shape[0], qa.shape[0], dtype=qs.dtype, device=device),
                "samples": torch.zeros((), dtype=qs.dtype, device=device),
            }
            for name, (qs, qa) in bases.items()
        }
        return {"spec": kfac_factors["spec"], "layers": layers}

    def update(
        state: EkfacState, logs: CurvatureLogs | ProjectedGrads, more: Logs | None = None
    ) -> EkfacState:
        grads, logs = checked_logs(state, logs, more)
        layers = {}
        for name, acc in state["layers"].items():
            qs, qa = bases[name]
            g = grads[name]
            if g.shape[-2:] != acc["squares"].shape:
                raise ValueError(
                    f"layer {name!r}: gradients [..., {g.shape[-2]}, {g.shape[-1]}] do not match "
                    f"the KFAC factors {tuple(acc['squares'].shape)} (another spec?)"
                )
            acts, backs = (None, None) if logs is None else token_logs(name, logs[name], g)
            if backs is not None and tokens_are_cheaper(*backs.shape[1:3], *g.shape[-2:]):
                check_finite(acts, name, "activations")
                check_finite(backs, name, "backprops")
                squares = _squares_from_tokens(qs, qa, acts, backs)
            else:
                check_finite(g, name, "gradients")
                squares = _squares_from_grads(qs, qa, g)
            layers[name] = {
                "squares": acc["squares"] + squares,
                "samples": acc["samples"] + g.shape[0],
            }
        return {"spec": state["spec"], "layers": layers}

    def finalize(state: EkfacState) -> Factors[KroneckerFactors]:
        layers = {}
        for name, acc in state["layers"].items():
            check_counted(acc["samples"], name)
            layers[name] = {
                **kfac_factors["layers"][name],
                "eigenvalues": acc["squares"] / acc["samples"],
            }
        return {"spec": state["spec"], "layers": layers}

    return Transform(init, update, finalize)


def token_logs(name: str, log: dict[str, Tensor], g: Tensor) -> tuple[Tensor, Tensor]:
    """Activations ``[B, T, k_in]`` and backprops ``[B, D, T, k_out]`` of one layer's logs."""
    acts, backs = log["activations"], log["backprops"]
    if backs.dim() == acts.dim():
        backs = backs.unsqueeze(1)
    size, draws, (k_out, k_in) = g.shape[0], g.shape[1] if g.dim() == 4 else 1, g.shape[-2:]
    if (
        acts.dim() != 3
        or backs.dim() != 4
        or acts.shape != (size, backs.shape[2], k_in)
        or backs.shape != (size, draws, acts.shape[1], k_out)
    ):
        raise ValueError(
            f"layer {name!r}: logs with activations {tuple(log['activations'].shape)} and "
            f"backprops {tuple(log['backprops'].shape)} do not match gradients {tuple(g.shape)} "
            "(pass the logs of the same batch)"
        )
    return acts, backs


def tokens_are_cheaper(draws: int, tokens: int, k_out: int, k_in: int) -> bool:
    """Whether rotating a sample's tokens costs fewer multiply-adds than rotating its gradients.

    Per sample: tokens ``T k_in² + D T k_out²`` to rotate, then ``D k_out k_in`` (``T = 1``:
    squares summed over the draws first, so ``k_out k_in``) or ``D T k_out k_in`` to contract;
    gradients ``D k_out k_in (k_out + k_in)``.
    """
    contract = k_out * k_in if tokens == 1 else draws * tokens * k_out * k_in
    rotate = tokens * k_in * k_in + draws * tokens * k_out * k_out
    return rotate + contract < draws * k_out * k_in * (k_out + k_in)


def _squares_from_grads(
    qs: Float[Tensor, "k_out k_out"],
    qa: Float[Tensor, "k_in k_in"],
    grads: Float[Tensor, "batch *draws k_out k_in"],
) -> Float[Tensor, "k_out k_in"]:
    """``Σ_samples,draws (Q_Sᵀ G Q_A)²``."""
    rotated = qs.T @ grads.to(qs.dtype) @ qa
    return rotated.pow(2).reshape(-1, *rotated.shape[-2:]).sum(0)


def _squares_from_tokens(
    qs: Float[Tensor, "k_out k_out"],
    qa: Float[Tensor, "k_in k_in"],
    activations: Float[Tensor, "batch tokens k_in"],
    backprops: Float[Tensor, "batch draws tokens k_out"],
) -> Float[Tensor, "k_out k_in"]:
    """``Σ_samples,draws (Σ_t (Q_Sᵀ δ_t)(Q_Aᵀ a_t)ᵀ)²``, the same sum from the token logs."""
    a = activations.to(qa.dtype) @ qa
    b = backprops.to(qs.dtype) @ qs
    if a.shape[1] == 1:
        return b[:, :, 0].pow(2).sum(1).T @ a[:, 0].pow(2)
    return torch.einsum("ndto,nti->ndoi", b, a).pow(2).sum((0, 1))
