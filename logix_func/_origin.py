"""Provenance: what produced a set of rows, factors or scores, and the check that refuses mixing.

A provenance is a small JSON-serialisable dict

    {"spec": spec tag (16 hex digits), "weights": weights fingerprint (16 hex), "loss": name}

where any entry may be ``None`` (unknown). Stores keep it in their schema, curvature factors
from :func:`~logix_func.fit_curvature` carry it, and :func:`check_provenance` compares the
sides of a computation entry by entry, wherever both sides know the entry.

The weights fingerprint hashes the *values* of every parameter and buffer the forward reads
(``params`` over the model's own), not only the covered layers': a projected gradient depends
on all of them. It is an exact blake2b hash of the bytes (with names, dtypes and shapes), so any
change of any value changes it. It takes ~0.5 s for GPT-2 small (124M float32 parameters) on
one CPU core, 0.12 of one ``projected_grads`` batch of 4 × 128 tokens
(``benchmarks/fingerprint.py``), and is computed once per pipeline call, not per batch.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._projection import json_tag
from .typing import Spec

Provenance = dict[str, str | None]
_WEIGHTS_TAG = b"lf.weights.v1"
_CHECKED = {
    "spec": (
        "projection specs",
        "compute every side with the same ProjectionSpec (a store's is "
        "ProjectionSpec.from_dict(store.schema.spec))",
    ),
    "weights": (
        "weights",
        "compute every side with the same weights: log a new store (or fit new factors) for "
        "these weights, or load the weights that produced the other side",
    ),
}


def weights_fingerprint(model: nn.Module, params: Mapping[str, Tensor] | None = None) -> str:
    """A 64-bit hex fingerprint of the values of ``model``'s parameters and buffers, with
    ``params`` replacing the model's own where given (as a pass with ``params`` sees them).

    Hashes, in name order, each tensor's name, dtype, shape and bytes (blake2b): equal weights
    give equal fingerprints on every run, process and device; any changed value changes it.
    """
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors.update(params or {})
    h = hashlib.blake2b(digest_size=8, person=_WEIGHTS_TAG)
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        data = t.to("cpu").contiguous().reshape(-1)
        h.update(memoryview(data.view(torch.uint8).numpy()))
    return h.hexdigest()


def loss_name(loss_fn: Any) -> str:
    """A stable name of a loss function: ``"default"`` for ``None``, else ``module.qualname``."""
    if loss_fn is None:
        return "default"
    if isinstance(loss_fn, functools.partial):
        return f"partial({loss_name(loss_fn.func)})"
    named = loss_fn if hasattr(loss_fn, "__qualname__") else type(loss_fn)
    return f"{getattr(named, '__module__', '?')}.{named.__qualname__}"


def spec_hex(spec: Spec | Mapping[str, Any] | Tensor | None) -> str | None:
    """The spec tag as 16 hex digits, of a ProjectionSpec, its dict or a state's int64 tag."""
    if spec is None:
        return None
    if isinstance(spec, Tensor):
        tag = spec
    else:
        tag = spec.tag() if hasattr(spec, "tag") else json_tag(spec)
    return f"{int(tag):016x}"


def provenance(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    spec: Spec | Mapping[str, Any] | None,
    *,
    loss_fn: Any = None,
) -> Provenance:
    """What rows computed as ``projected_grads(model, params, batch, spec, loss_fn=loss_fn)``
    come from: pass it as ``query_provenance=`` to :func:`~logix_func._influence`."""
    return {
        "spec": spec_hex(spec),
        "weights": weights_fingerprint(model, params),
        "loss": loss_name(loss_fn),
    }


def stamped(factors: Mapping[str, Any], model: nn.Module, params: Any, loss_fn: Any) -> dict:
    """Curvature factors with the weights fingerprint and loss name they were fitted with
    (their ``"spec"`` tag is already there): preconditioners built from them check both."""
    return {**factors, "weights": weights_fingerprint(model, params), "loss": loss_name(loss_fn)}


def factors_provenance(factors: Mapping[str, Any]) -> Provenance:
    """The provenance curvature factors record (``None`` entries where they record none)."""
    return {
        "spec": spec_hex(factors.get("spec")),
        "weights": factors.get("weights"),
        "loss": factors.get("loss"),
    }


def store_provenance(store: Any) -> Provenance:
    """The provenance a LogStore's schema records (entries ``None`` for older stores)."""
    schema = store.schema
    return {"spec": spec_hex(schema.spec), "weights": schema.weights, "loss": schema.loss}


def check_provenance(sides: Mapping[str, Provenance | None]) -> None:
    """Refuse sides ``{description: provenance}`` that disagree on the spec or the weights.

    The loss is not compared: a query's measurement may differ from the training loss.
    """
    known = {k: v for k, v in sides.items() if v is not None}
    names = list(known)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for key, (what, advice) in _CHECKED.items():
                x, y = known[a].get(key), known[b].get(key)
                if x is not None and y is not None and x != y:
                    raise ValueError(
                        f"{a} and {b} come from different {what} ({key} {x} vs {y}): scoring "
                        f"them together would be silently wrong. What to do: {advice}"
                    )
