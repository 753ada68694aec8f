"""Curvature state: plain dicts of tensors, merged by summation, saved beside the logs."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._dual import is_rows
from .transform import CurvatureFactors, State

if TYPE_CHECKING:
    from ..store.kvstore import Location

Saved = State[Any] | CurvatureFactors


def _check_same(a: Any, b: Any, path: str) -> None:
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            raise ValueError(f"cannot merge curvature states: keys differ at {path or 'top level'}")
        for k in a:
            _check_same(a[k], b[k], f"{path}.{k}" if path else k)
    elif isinstance(a, Tensor) and (
        not isinstance(b, Tensor) or _shape(a, path) != _shape(b, path)
    ):
        raise ValueError(f"cannot merge curvature states: {path} has different shapes")


def _shape(t: Tensor, path: str) -> tuple[int, ...]:
    """The shape two states must share: a dual GGN's rows (``row_*``) only their width."""
    return tuple(t.shape[-1:]) if is_rows(path.rsplit(".", 1)[-1]) else tuple(t.shape)


def merge_states(*states: State[Any]) -> State[Any]:
    """Sum of curvature states from several chunks or processes (the ``spec`` tag must agree);
    a dual GGN's rows (``row_*``) are concatenated in the order of ``states``.

    Because every update is a sum, ``merge_states(update(s0, a), update(s0, b))`` equals
    ``update(update(s0, a), b)`` up to the initial state counted twice: merge states that each
    started from ``init``. For ``torch.distributed``, ``all_reduce`` every tensor except
    ``state["spec"]`` instead.
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    first = states[0]
    for s in states[1:]:
        _check_same(first, s, "")
        if not torch.equal(first["spec"], s["spec"]):
            raise ValueError("cannot merge curvature states built for different projection specs")

    def add(key: str, *leaves: Any) -> Any:
        if isinstance(leaves[0], Mapping):
            return {k: add(k, *(leaf[k] for leaf in leaves)) for k in leaves[0]}
        if is_rows(key):  # a dual GGN's rows: appended, not summed
            return torch.cat([leaf for leaf in leaves if len(leaf)] or leaves[:1])
        return sum(leaves[1:], leaves[0])

    merged = {k: add(k, *(s[k] for s in states)) for k in first if k != "spec"}
    return {"spec": first["spec"], **merged}


def save_state(state: Saved, url: Location) -> None:
    """Write a state (or finalized factors) to a local path, a tensorstore kvstore URL or a
    kvstore spec dict (see :mod:`logix_func.store.kvstore`)."""
    from ..store.kvstore import write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(url, buf.getvalue())


def load_state(url: Location) -> Saved:
    """Read what :func:`save_state` wrote."""
    from ..store.kvstore import read_bytes

    return torch.load(io.BytesIO(read_bytes(url)), weights_only=True)
