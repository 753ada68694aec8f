"""Choosing layers by name or glob pattern, and what their rows cost per example.

A pattern is a shell-style glob (``fnmatch``: ``*`` matches any run of characters, dots
included; ``?`` one character; ``[...]`` a set). It matches a layer when it matches the layer's
module name (``"transformer.h.*.mlp.*"``) or the name of its weight parameter (``"*.weight"``,
``"*.in_proj_weight"``). A name without ``*?[`` is taken literally.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .layers import LayerSpec

_GLOB = set("*?[")
_LISTED = 30  # names shown in an error message


def is_pattern(name: str) -> bool:
    """Whether ``name`` is a glob pattern rather than a literal name."""
    return bool(_GLOB & set(name))


def matches(pattern: str, name: str, layer: LayerSpec) -> bool:
    """Whether ``pattern`` selects the layer ``name`` (a literal: its module name only)."""
    if not is_pattern(pattern):
        return pattern == name
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(layer.weight, pattern)


def select(
    found: Mapping[str, LayerSpec], patterns: Sequence[str], *, what: str = "layers"
) -> list[str]:
    """The names of ``found`` that some pattern selects, in ``found``'s order.

    Every pattern must select at least one layer: one that selects none raises a ``KeyError``
    listing the available names (a typo would otherwise silently change what is covered).
    """
    if isinstance(patterns, str):
        raise TypeError(f"{what} must be a list of names or patterns, not a string")
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {n for n, layer in found.items() if matches(pattern, n, layer)}
        if not hits:
            raise KeyError(f"{what}: {pattern!r} matches no projectable layer; {available(found)}")
        chosen |= hits
    return [n for n in found if n in chosen]


def available(found: Mapping[str, LayerSpec]) -> str:
    """``"the N projectable layers are: a, b, …"`` for error messages."""
    names = list(found)
    shown = ", ".join(names[:_LISTED]) + (", …" if len(names) > _LISTED else "")
    return f"the {len(names)} projectable layers are: {shown}"


@dataclass(frozen=True)
class RowSize:
    """Floats and bytes of one example's row: ``floats[layer] = k_out · k_in``."""

    floats: dict[str, int]
    itemsize: int

    @property
    def total_floats(self) -> int:
        return sum(self.floats.values())

    @property
    def bytes(self) -> dict[str, int]:
        """Bytes per example of each layer."""
        return {n: f * self.itemsize for n, f in self.floats.items()}

    @property
    def total_bytes(self) -> int:
        return self.total_floats * self.itemsize

    def __str__(self) -> str:
        width = max(len(n) for n in [*self.floats, "total"])
        rows = [*self.floats.items(), ("total", self.total_floats)]
        return "\n".join(
            f"{n:<{width}}  {f:>12,} floats  {human(f * self.itemsize):>9}" for n, f in rows
        )


def row_size(layers: Mapping[str, LayerSpec], dtype: torch.dtype = torch.float32) -> RowSize:
    """The :class:`RowSize` of rows of ``layers`` stored in ``dtype``."""
    floats = {n: layer.rank_out * layer.rank_in for n, layer in layers.items()}
    return RowSize(floats, torch.empty((), dtype=dtype).element_size())


def human(n: float) -> str:
    """``n`` bytes as ``"640.0 KB"`` (powers of 1000)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"
