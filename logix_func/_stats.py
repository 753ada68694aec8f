"""Running mean, variance and covariance on the transform contract of the curvature estimators.

``stat = running_variance()`` gives ``stat.init(example, device=None)``, ``stat.update(state,
x)`` and ``stat.finalize(state)`` (:class:`~logix_func.curvature.transform.Transform`'s
signatures: ``example`` may be a projection spec and ``x`` a ``CurvatureLogs``, whose
gradients are then the rows), plus ``stat.merge``.

A state is a plain dict of tensors — ``{"n": [], "mean": [*shape]}`` plus ``"m2": [*shape]``
(variance) or ``"m2": [D, D]`` with ``D = prod(shape)`` (covariance) — or a ``{name: state}``
dict with one state per leaf of a ``{name: Tensor}`` log. ``n`` is the total row weight,
``m2`` the sum of weighted squared deviations (co-moments) from ``mean``.

``update`` never changes the state it is given. Each batch is summarised where it lives (in its
own precision, at least float32) relative to its own rounded mean, so that a large common offset
cancels exactly; only the summary, state-sized, moves to the state's device and dtype, where it is
combined with Chan et al.'s parallel formula. The same formula merges chunks and processes:
:func:`~logix_func.all_reduce_state` reduces these states too (through :func:`all_reduce_stat`).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from .curvature.transform import CurvatureLogs, Device
from .typing import Spec

Kind = Literal["mean", "variance", "covariance"]
State = dict[str, Tensor]
Tree = Tensor | Mapping[str, "Tree"]
ShapeLike = int | tuple[int, ...] | list[int] | torch.Size


def _check_shape(shape: ShapeLike) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise TypeError(f"a row shape is a tuple of non-negative ints, got {shape!r}")
    return shape


def _is_leaf_state(state: Mapping) -> bool:
    return "n" in state and all(isinstance(v, Tensor) for v in state.values())


def _check_keys(what: str, got: Mapping, want: Mapping) -> None:
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise KeyError(f"{what} keys differ from the state's: missing {missing}, extra {extra}")


def _rows_weights(
    shape: tuple[int, ...], x: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``x [*lead, *shape]`` as rows ``[R, *shape]`` and the row weights ``[R]`` (or None)."""
    k = x.ndim - len(shape)
    if k < 1 or tuple(x.shape[k:]) != shape:
        raise ValueError(
            f"expected rows of shape {shape} after at least one leading (batch) dimension, "
            f"got a tensor of shape {tuple(x.shape)}"
        )
    if x.is_complex():
        raise TypeError(f"running statistics need real inputs, got {x.dtype}")
    lead = tuple(x.shape[:k])
    rows = x.reshape((math.prod(lead),) + shape)
    if mask is None:
        return rows, None
    if not 1 <= mask.ndim <= k or tuple(mask.shape) != lead[: mask.ndim]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match the leading dimensions {lead} "
            f"of a tensor of shape {tuple(x.shape)} (rows of shape {shape})"
        )
    weights = mask.to(device=x.device).reshape(mask.shape + (1,) * (k - mask.ndim)).expand(lead)
    return rows, weights.reshape(-1)


@dataclass(frozen=True)
class RunningStat:
    """A running statistic: ``init`` / ``update`` / ``merge`` / ``finalize`` over dict states.

    ``kind`` is ``"mean"``, ``"variance"`` (elementwise) or ``"covariance"`` (of the flattened
    row); ``ddof`` is subtracted from the total weight in ``finalize`` (0: population, 1: sample).
    """

    kind: Kind
    ddof: int = 0

    # ----------------------------------------------------------------- public API

    def init(
        self,
        example: Tree | ShapeLike | Mapping | Spec,
        device: Device = None,
        *,
        dtype: torch.dtype = torch.float64,
    ) -> State | dict:
        """An empty state.

        ``example`` is a row shape (``(H,)``), a batch ``[N, *shape]`` like the ones passed to
        ``update`` (its rows fix the shape, its device is the default ``device``), a
        ``{name: shape or batch}`` dict, or a projection spec (rows ``[k_out, k_in]`` per
        layer: the statistic of projected gradients). ``device`` (default: the example's, else
        CPU) and ``dtype`` (default float64) are where and how the state is kept, whatever the
        inputs.
        """
        if hasattr(example, "dims"):
            example = example.dims()
        if isinstance(example, Mapping):
            return {k: self.init(v, device=device, dtype=dtype) for k, v in example.items()}
        if isinstance(example, Tensor):
            if example.ndim < 1:
                raise ValueError("an example batch needs a leading batch dimension")
            shape, device = tuple(example.shape[1:]), device or example.device
        else:
            shape = _check_shape(example)
        zeros = dict(device=torch.device(device or "cpu"), dtype=dtype)
        if not dtype.is_floating_point:
            raise TypeError(f"the state dtype must be floating point, got {dtype}")
        state = {"n": torch.zeros((), **zeros), "mean": torch.zeros(shape, **zeros)}
        if self.kind == "variance":
            state["m2"] = torch.zeros(shape, **zeros)
        elif self.kind == "covariance":
            d = math.prod(shape)
            state["m2"] = torch.zeros((d, d), **zeros)
        return state

    def update(
        self,
        state: State | dict,
        x: Shaped[Tensor, "..."] | Mapping | CurvatureLogs,
        mask: Shaped[Tensor, "..."] | Mapping | None = None,
    ) -> State | dict:
        """The state after seeing the rows of ``x``; ``state`` itself is left unchanged.

        A :class:`~logix_func.curvature.transform.CurvatureLogs` stands for its ``grads``
        ``{layer: [B, (D,) k_out, k_in]}`` (every sample, and label draw, one row).

        ``x`` is ``[*lead, *shape]``: every position of the leading dimensions (``[N]`` or
        ``[N, T]`` …) is one row. ``mask`` (optional) has the leading dimensions or a prefix
        of them (``[N]`` for ``x [N, T, H]`` weighs whole samples); ``False``/0 excludes a row
        (its values, even NaN, are never read), float values are non-negative frequency
        weights. Dicts are mapped leaf-wise; ``mask`` may be one tensor for every leaf or a
        dict with the same keys.
        """
        if isinstance(x, CurvatureLogs):
            x = x.grads
        if isinstance(x, Mapping):
            _check_keys("input", x, state)
            if isinstance(mask, Mapping):
                _check_keys("mask", mask, state)
            return {
                k: self.update(state[k], v, mask[k] if isinstance(mask, Mapping) else mask)
                for k, v in x.items()
            }
        if not isinstance(state, Mapping) or not _is_leaf_state(state):
            raise TypeError("a tensor input needs a single-leaf state (a dict of tensors)")
        return self.merge(state, self._from_sums(state, *self._batch_sums(state, x, mask)))

    def merge(self, a: State | dict, b: State | dict) -> State | dict:
        """The state of the union of the rows seen by ``a`` and by ``b`` (Chan et al.).

        ``b`` is moved to ``a``'s device and dtype; neither is changed.
        """
        if not _is_leaf_state(a):
            _check_keys("merged state", b, a)
            return {k: self.merge(a[k], b[k]) for k in a}
        b = {k: v.to(a["n"]) for k, v in b.items()}
        n = a["n"] + b["n"]
        n_safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = b["mean"] - a["mean"]
        out = {"n": n, "mean": a["mean"] + delta * (b["n"] / n_safe)}
        if "m2" in a:
            out["m2"] = a["m2"] + b["m2"] + self._outer(delta, delta) * (a["n"] * b["n"] / n_safe)
        return out

    def finalize(self, state: State | dict) -> Float[Tensor, "..."] | dict:
        """The mean ``[*shape]``, variance ``[*shape]`` or covariance ``[D, D]``."""
        if not _is_leaf_state(state):
            return {k: self.finalize(v) for k, v in state.items()}
        n = float(state["n"])
        if self.kind == "mean":
            if n <= 0:
                raise ValueError("no rows were seen (total weight 0): the mean is undefined")
            return state["mean"]
        if n <= self.ddof:
            raise ValueError(
                f"{self.kind} with ddof={self.ddof} needs a total weight > {self.ddof}, got {n}"
            )
        return state["m2"] / (state["n"] - self.ddof)

    def to_sums(self, state: State | dict, shift: Tensor | Mapping) -> State | dict:
        """Sum-able moments about ``shift`` (``[*shape]``): ``n``, ``s1 = Σw(x-shift)`` and
        ``s2 = Σw(x-shift)²`` (or ``Σw(x-shift)(x-shift)ᵀ``). Sums of these over states with
        one common shift are the sums of the union: all-reduce them, then ``from_sums``."""
        if not _is_leaf_state(state):
            return {k: self.to_sums(v, shift[k]) for k, v in state.items()}
        shift = shift.to(state["mean"])
        d = state["mean"] - shift
        sums = {"n": state["n"], "s1": state["n"] * d}
        if "m2" in state:
            sums["s2"] = state["m2"] + state["n"] * self._outer(d, d)
        return sums

    def from_sums(self, sums: State | dict, shift: Tensor | Mapping) -> State | dict:
        """The state whose moments about ``shift`` are ``sums`` (inverse of ``to_sums``)."""
        if not _is_leaf_state(sums):
            return {k: self.from_sums(v, shift[k]) for k, v in sums.items()}
        return self._from_sums(sums, sums["n"], shift, sums["s1"], sums.get("s2"))

    def all_reduce(self, state: State | dict, group=None) -> State | dict:
        """The merged state of every process in ``group``, on every process: :func:`all_reduce_stat`
        (:func:`~logix_func.all_reduce_state` does the same)."""
        return all_reduce_stat(state, group)

    # ----------------------------------------------------------------- internals

    def _outer(self, a: Tensor, b: Tensor) -> Tensor:
        if self.kind == "covariance":
            return a.reshape(-1, 1) * b.reshape(1, -1)
        return a * b

    def _batch_sums(
        self, state: State, x: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(n, shift, s1, s2)`` of a batch, computed on ``x``'s device, shift = its mean."""
        rows, w = _rows_weights(tuple(state["mean"].shape), x, mask)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        col = (-1,) + (1,) * (rows.ndim - 1)
        if w is None:
            n = torch.full((), rows.shape[0], dtype=rows.dtype, device=rows.device)
        else:
            w = w.to(rows.dtype)
            keep = (w != 0).reshape(col)
            rows = torch.where(keep, rows, torch.zeros_like(rows))
            n = w.sum()
        n_safe = torch.where(n > 0, n, torch.ones_like(n))

        def weighted_sum(t: Tensor) -> Tensor:
            return t.sum(0) if w is None else (w.reshape(col) * t).sum(0)

        shift = weighted_sum(rows) / n_safe
        centred = rows - shift
        if w is not None:
            centred = torch.where(keep, centred, torch.zeros_like(centred))
        s1 = weighted_sum(centred)
        if self.kind == "mean":
            return n, shift, s1, None
        if self.kind == "variance":
            return n, shift, s1, weighted_sum(centred * centred)
        flat = centred.reshape(rows.shape[0], math.prod(rows.shape[1:]))
        return n, shift, s1, flat.T @ (flat if w is None else w.reshape(-1, 1) * flat)

    def _from_sums(
        self, like: State, n: Tensor, shift: Tensor, s1: Tensor, s2: Tensor | None
    ) -> State:
        """Moments about ``shift`` → a state on ``like``'s device and dtype."""
        n, shift, s1 = (t.to(like["n"]) for t in (n, shift, s1))
        n_safe = torch.where(n > 0, n, torch.ones_like(n))
        state = {"n": n, "mean": shift + s1 / n_safe}
        if s2 is not None:
            state["m2"] = s2.to(like["n"]) - self._outer(s1, s1) / n_safe
        return state


def is_stat_state(state: Mapping) -> bool:
    """Whether ``state`` is a running statistic's (a leaf state or a dict of them)."""
    if _is_leaf_state(state):
        return True
    return bool(state) and all(isinstance(v, Mapping) and is_stat_state(v) for v in state.values())


def _kind_of(state: State) -> Kind:
    """A leaf state's kind, from its entries: no ``m2``, an elementwise or a ``[D, D]`` one."""
    if "m2" not in state:
        return "mean"
    return "variance" if state["m2"].shape == state["mean"].shape else "covariance"


def all_reduce_stat(state: State | dict, group=None) -> State | dict:
    """The merged state of every process in ``group``, on every process.

    Two all-reduces of one flat tensor each: first ``n`` and ``n · mean`` give the common
    shift (the overall mean, so ranks without data are harmless), then ``to_sums`` about
    it; returns ``from_sums``. The state's device must suit the group's backend (a
    CPU-offloaded state needs a gloo group).
    """
    import torch.distributed as dist

    leaves = _leaves(state)
    stat = RunningStat(_kind_of(leaves[0]))
    totals = [t for s in leaves for t in (s["n"], s["n"] * s["mean"])]
    totals = iter(_unflatten(_flat_op(totals, dist.all_reduce, group=group), totals))
    shifts = []
    for n, n_mean in zip(totals, totals, strict=True):
        shifts.append(n_mean / torch.where(n > 0, n, torch.ones_like(n)))
    sums = [stat.to_sums(s, h) for s, h in zip(leaves, shifts, strict=True)]
    flat = [t for s in sums for t in s.values()]
    reduced = iter(_unflatten(_flat_op(flat, dist.all_reduce, group=group), flat))
    merged = [
        stat.from_sums({k: next(reduced) for k in s}, h) for s, h in zip(sums, shifts, strict=True)
    ]
    return _rebuild(state, iter(merged))


def _leaves(state: Mapping) -> list[State]:
    if _is_leaf_state(state):
        return [state]
    return [leaf for k in sorted(state) for leaf in _leaves(state[k])]


def _rebuild(state: Mapping, leaves) -> State | dict:
    if _is_leaf_state(state):
        return next(leaves)
    return {k: _rebuild(state[k], leaves) for k in sorted(state)}


def _flat_op(tensors: list[Tensor], op, **kwargs) -> Tensor:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    op(flat, **kwargs)
    return flat


def _unflatten(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    parts = flat.split([t.numel() for t in like])
    return [p.reshape(t.shape) for p, t in zip(parts, like, strict=True)]


def running_mean() -> RunningStat:
    """Running mean of rows: ``finalize`` → ``[*shape]``."""
    return RunningStat("mean")


def running_variance(ddof: int = 0) -> RunningStat:
    """Running elementwise variance of rows: ``finalize`` → ``[*shape]`` (``m2 / (n - ddof)``)."""
    return RunningStat("variance", ddof)


def running_covariance(ddof: int = 0) -> RunningStat:
    """Running covariance of flattened rows: ``finalize`` → ``[D, D]``, ``D = prod(shape)``."""
    return RunningStat("covariance", ddof)
