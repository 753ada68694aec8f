"""The one contract of every curvature estimator and running statistic, declared once.

As optax's ``GradientTransformation``, a :class:`Transform` is three pure functions over an
explicit state:

* ``init(spec, device=None) -> state``: zero sums for every layer of ``spec``;
* ``update(state, logs) -> state``: the state after one batch's :class:`CurvatureLogs`
  (a new dict; ``state`` is left unchanged);
* ``finalize(state) -> factors``.

States and factors are dicts of tensors (the TypedDicts below), so ``save_state`` writes them
with ``weights_only=True``, and states of disjoint data merge by summation (``merge_states``,
``all_reduce_state``). ``state["spec"]`` is the spec's tag (``ProjectionSpec.tag``): states
and factors of other specs are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, NamedTuple, NotRequired, Protocol, TypedDict, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..typing import Logs, ProjectedGrads, Spec

Device = torch.device | str | None
L = TypeVar("L")


class CurvatureLogs(NamedTuple):
    """One batch's logs, as :func:`~logix_func.fisher_logs` returns them.

    ``grads``: ``{layer: [B, (D,) k_out, k_in]}`` projected per-sample gradients (D label
    draws, optional); ``logs``: ``{layer: {"activations": [B, T, k_in], "backprops": [B, (D,)
    T, k_out], "mask": [B, T]}}`` (padded tokens zeroed), or ``None`` where only gradients
    are at hand (``raw``, ``ekfac``).
    """

    grads: ProjectedGrads
    logs: Logs | None = None


class InitFn(Protocol):
    """``init(spec, device=None) -> state``."""

    def __call__(self, spec: Spec, device: Device = None) -> Any: ...


class UpdateFn(Protocol):
    """``update(state, logs) -> state``, pure."""

    def __call__(self, state: Any, logs: CurvatureLogs) -> Any: ...


class FinalizeFn(Protocol):
    """``finalize(state) -> factors``."""

    def __call__(self, state: Any) -> Any: ...


class Transform(NamedTuple):
    """``init(spec, device=None) -> state``, ``update(state, logs) -> state``,
    ``finalize(state) -> factors``."""

    init: InitFn
    update: UpdateFn
    finalize: FinalizeFn


def alongside(main: Transform, extra: Transform, extra_spec: Spec) -> Transform:
    """``main`` over every layer and, in the same pass, ``extra`` over ``extra_spec``'s layers,
    whose factors then replace ``main``'s (``fit_curvature(method="auto")``: EKFAC with the GGN
    layers riding along). The state is ``main``'s with ``extra``'s layers under ``"extra"``."""
    names, tag = list(extra_spec.dims()), extra_spec.tag()

    def pick(d: Mapping[str, Any] | None) -> dict[str, Any] | None:
        return None if d is None else {n: d[n] for n in names if n in d}

    def init(spec: Spec, device: Device = None) -> AlongsideState:
        return {**main.init(spec, device), "extra": extra.init(extra_spec, device)["layers"]}

    def update(state: AlongsideState, logs: CurvatureLogs) -> AlongsideState:
        logs = curvature_logs(logs, None)
        inner = {"spec": tag, "layers": state["extra"]}
        inner = extra.update(inner, CurvatureLogs(pick(logs.grads), pick(logs.logs)))
        outer = main.update({"spec": state["spec"], "layers": state["layers"]}, logs)
        return {**outer, "extra": inner["layers"]}

    def finalize(state: AlongsideState) -> CurvatureFactors:
        factors = main.finalize({"spec": state["spec"], "layers": state["layers"]})
        replaced = extra.finalize({"spec": tag, "layers": state["extra"]})["layers"]
        return {**factors, "layers": {**factors["layers"], **replaced}}

    return Transform(init, update, finalize)


# ------------------------------------------------------------------ states and factors


class State(TypedDict, Generic[L]):
    """A transform's state: the spec tag and one entry per layer."""

    spec: Int[Tensor, ""]
    layers: dict[str, L]


class Factors(TypedDict, Generic[L]):
    """Finalized factors: the spec tag, one entry per layer and, from
    :func:`~logix_func.fit_curvature`, the weights fingerprint and loss name."""

    spec: Int[Tensor, ""]
    layers: dict[str, L]
    weights: NotRequired[str]
    loss: NotRequired[str]


class KfacLayerState(TypedDict):
    """Sums ``A = Σ a aᵀ`` ``[k_in, k_in]``, ``S = Σ δ δᵀ`` ``[k_out, k_out]``, counts."""

    A: Float[Tensor, "k_in k_in"]
    S: Float[Tensor, "k_out k_out"]
    tokens: Float[Tensor, ""]
    samples: Float[Tensor, ""]


class EkfacLayerState(TypedDict):
    """``Σ (Q_Sᵀ G Q_A)²`` ``[k_out, k_in]`` and the sample count."""

    squares: Float[Tensor, "k_out k_in"]
    samples: Float[Tensor, ""]


class RawLayerState(TypedDict):
    """``Σ vec(G) vec(G)ᵀ`` ``[k, k]``, ``k = k_out·k_in``, and the sample count."""

    C: Float[Tensor, "k k"]
    samples: Float[Tensor, ""]


class KroneckerFactors(TypedDict):
    """KFAC/EKFAC: ``H ≈ (Q_S ⊗ Q_A) diag(eigenvalues) (Q_S ⊗ Q_A)ᵀ``."""

    A: Float[Tensor, "k_in k_in"]
    S: Float[Tensor, "k_out k_out"]
    QA: Float[Tensor, "k_in k_in"]
    QS: Float[Tensor, "k_out k_out"]
    eigenvalues: Float[Tensor, "k_out k_in"]


class EigenFactors(TypedDict):
    """Raw or exact: ``C = Q diag(eigenvalues) Qᵀ`` over the flattened gradient."""

    C: Float[Tensor, "k k"]
    Q: Float[Tensor, "k k"]
    eigenvalues: Float[Tensor, " k"]


class DenseFactors(TypedDict):
    """``raw(eigh=False)``, the GGN: ``C`` alone, solved through a Cholesky factor."""

    C: Float[Tensor, "k k"]


class JointRowState(TypedDict):
    """The joint GGN's: this layer's block row ``Σ g_l gᵀ`` ``[k_l, K]`` and the sample count."""

    rows: Float[Tensor, "k K"]
    samples: Float[Tensor, ""]


class JointRowFactors(TypedDict):
    """The joint GGN: this layer's block row ``C[l, :]`` ``[k_l, K]`` of the all-layer ``C``,
    columns in sorted layer order."""

    rows: Float[Tensor, "k K"]


class DualRowState(TypedDict):
    """The dual GGN's: the rows so far, ``row_acts`` ``[N, k_in]`` and ``row_backs``
    ``[N, D, k_out]`` (one token per sample) or ``row_grads`` ``[R, k_out, k_in]``
    (``R = N·D``), and the sample count."""

    row_acts: NotRequired[Float[Tensor, "N k_in"]]
    row_backs: NotRequired[Float[Tensor, "N D k_out"]]
    row_grads: NotRequired[Float[Tensor, "R k_out k_in"]]
    samples: Float[Tensor, ""]


class DualRowFactors(TypedDict):
    """The dual GGN: this layer's rows scaled by ``1/√N`` (``G_ll = Σ_r φ_r φ_rᵀ``), as
    ``row_acts`` ``[N, k_in]`` and ``row_backs`` ``[N, D, k_out]`` (``φ_nd = b_nd a_nᵀ``) or as
    ``row_grads`` ``[R, k_out, k_in]``, rows in (sample, draw) order in every layer."""

    row_acts: NotRequired[Float[Tensor, "N k_in"]]
    row_backs: NotRequired[Float[Tensor, "N D k_out"]]
    row_grads: NotRequired[Float[Tensor, "R k_out k_in"]]


class AlongsideState(TypedDict):
    """:func:`alongside`'s: the main transform's state and the extra one's layers."""

    spec: Int[Tensor, ""]
    layers: dict[str, Any]
    extra: dict[str, Any]


LayerFactors = KroneckerFactors | EigenFactors | DenseFactors | JointRowFactors | DualRowFactors
KfacState = State[KfacLayerState]
EkfacState = State[EkfacLayerState]
RawState = State[RawLayerState]
CurvatureFactors = Factors[LayerFactors]


# ------------------------------------------------------------------ the older call forms


def curvature_logs(
    logs: CurvatureLogs | tuple | ProjectedGrads, more: Logs | None
) -> CurvatureLogs:
    """``update(state, CurvatureLogs(grads, logs))``, or the older ``update(state, grads,
    logs=None)`` of ``raw`` and ``ekfac``."""
    if isinstance(logs, tuple):
        if more is not None:
            raise TypeError("pass the logs inside CurvatureLogs(grads, logs), not beside it")
        return CurvatureLogs(*logs)
    return CurvatureLogs(logs, more)


def checked_logs(
    state: Mapping[str, Any], logs: CurvatureLogs | tuple | ProjectedGrads, more: Logs | None
) -> CurvatureLogs:
    """:func:`curvature_logs`, with the gradients (and the logs, where given) checked to
    cover exactly the state's layers."""
    grads, logs = curvature_logs(logs, more)
    check_layers(state["layers"], grads, "gradient layers")
    if logs is not None:
        check_layers(state["layers"], logs, "logged layers")
    return CurvatureLogs(grads, logs)


def kfac_logs(logs: CurvatureLogs | tuple | Logs) -> Logs:
    """KFAC reads ``CurvatureLogs.logs``; the older ``update(state, logs)`` passed them bare."""
    if isinstance(logs, tuple):
        logs = CurvatureLogs(*logs).logs
        if logs is None:
            raise ValueError("kfac needs the activation and backprop logs: CurvatureLogs.logs")
    return logs


# ------------------------------------------------------------------ checks


def check_layers(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
    """``got`` must cover exactly the layers of ``expected``."""
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ValueError(
            f"{what} do not match the curvature state's layers: missing {missing}, "
            f"unexpected {extra}"
        )


def check_finite(x: Tensor, layer: str, what: str) -> None:
    """Refuse NaN or inf values, naming the layer and the samples (skipped when compiled)."""
    # a sum is finite only if every term is: one reduction on the common path
    if torch.compiler.is_compiling() or torch.isfinite(x.sum()):
        return
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"non-finite {what} in layer {layer!r} for samples at batch positions {rows[:10]}"
            f"{' …' if len(rows) > 10 else ''}: check the loss and inputs of those samples"
        )


def check_counted(samples: Tensor, layer: str) -> None:
    """Finalizing needs at least one accumulated sample per layer."""
    if samples == 0:
        raise ValueError(f"layer {layer!r}: no samples were accumulated")
