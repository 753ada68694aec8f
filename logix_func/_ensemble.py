"""Ensembles: influence combined over K checkpoints or independently trained models.

Member ``k`` has its own training rows (in memory or a LogStore), preconditioner and query rows,
each from its own model and projection spec. The combined score is a weighted sum

``score(q, t) = Σ_k w_k · k_k(q, t)``,   ``k_k(q, t) = ⟨P_k g_q^k, g_t^k⟩``

with ``w_k = 1/K`` by default (TRAK's mean over models) or learning rates ``η_k``
(TracIn-CP's sum over checkpoints). Scores stream chunk by chunk over the first member's rows;
the other members' rows of the same data ids are read alongside, so only one ``[Q, n]`` chunk
per member is held at a time and stores may differ in row order and sharding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from ._influence import (
    Chunk,
    Precondition,
    Rows,
    TopK,
    check_compatible,
    check_finite,
    check_scores,
    check_sources,
    flat,
    iter_rows,
    num_rows,
    self_kernel,
    top_k,
)
from .curvature import IdentityPreconditioner, preconditioner
from .curvature._kfac import Fisher
from .pipeline import IdsFn, fit_curvature, log_dataset
from .store import LogStore


class Member(NamedTuple):
    """One model of an ensemble: its training rows and their preconditioner (``None`` =
    identity)."""

    train: Rows | LogStore
    preconditioner: Precondition | None = None


def _describe(k: int, member: Member) -> str:
    where = "in-memory rows" if isinstance(member.train, Mapping) else member.train.url
    return f"member {k} ({where})"


def _ids(train: Rows | LogStore) -> np.ndarray:
    """Data ids of a member's rows as a numpy array (positions for in-memory rows)."""
    if isinstance(train, Mapping):
        return np.arange(num_rows(train))
    ids = train.ids()
    return ids.numpy() if isinstance(ids, Tensor) else np.array(ids, dtype=object)


def _check_preconditioner(k: int, member: Member) -> None:
    """A member's preconditioner must be fitted on rows like its own: same layers, shapes and,
    for a store, the same projection spec."""
    pre = member.preconditioner
    if pre is None or isinstance(pre, IdentityPreconditioner) or not hasattr(pre, "layers"):
        return
    train = member.train
    shapes = (
        {n: tuple(v.shape[1:]) for n, v in train.items()}
        if isinstance(train, Mapping)
        else {n: tuple(s) for n, s in train.schema.layers.items()}
    )
    if set(pre.layers) != set(shapes):
        raise ValueError(
            f"{_describe(k, member)}: its preconditioner covers layers {sorted(pre.layers)}, "
            f"its rows {sorted(shapes)}: was it fitted for another member?"
        )
    for name, factors in pre.layers.items():
        size = math.prod(shapes[name])
        fitted = factors["C"].shape[0] if "C" in factors else factors["eigenvalues"].numel()
        if fitted != size:
            raise ValueError(
                f"{_describe(k, member)}: layer {name!r} has rows of {size} entries, its "
                f"preconditioner {fitted}: was it fitted for another member?"
            )
    try:  # the spec and weights fingerprint the store and the factors record
        check_sources(None, train, pre)
    except ValueError as e:
        raise ValueError(f"{_describe(k, member)}: was it fitted for another member? {e}") from None


def check_members(members: Sequence[Member], queries: Sequence[Rows] | None = None) -> None:
    """Refuse members that cannot be combined: the one place ensemble compatibility is checked.

    * at least one member, and one query rows dict per member (``queries``, when given), finite,
      whose layers and shapes match that member's training rows;
    * each member's preconditioner fitted on rows like its own (layers, entries per layer, and
      the projection spec its store records);
    * every member's rows have the same data ids (the same training set), each id once.

    What a store or factors record of their origin (model weights, spec) is compared here too,
    so a check added once covers scoring, top-k and self-influence alike.
    """
    if len(members) == 0:
        raise ValueError("an ensemble needs at least one member")
    members = [m if isinstance(m, Member) else Member(*m) for m in members]
    if queries is not None and len(queries) != len(members):
        raise ValueError(
            f"got {len(queries)} query rows dicts for {len(members)} members: pass one per "
            "member, computed with that member's model and spec"
        )
    for k, member in enumerate(members):
        if queries is not None:
            try:
                check_compatible(queries[k], member.train)
                count = num_rows(queries[k])
                check_finite(Chunk(list(range(count)), dict(queries[k])), "query")
            except ValueError as e:
                raise ValueError(f"{_describe(k, member)}: {e}") from None
        _check_preconditioner(k, member)
    first = _ids(members[0].train)
    reference = set(first.tolist())
    if len(reference) != len(first):
        raise ValueError(f"{_describe(0, members[0])} holds some data ids more than once")
    for k, member in enumerate(members[1:], start=1):
        ids = _ids(member.train)
        got = set(ids.tolist())
        if got != reference or len(ids) != len(first):
            missing, extra = sorted(reference - got, key=str), sorted(got - reference, key=str)
            raise ValueError(
                f"{_describe(k, member)} was logged on other data than {_describe(0, members[0])}"
                f": {len(missing)} ids missing (e.g. {missing[:5]}), {len(extra)} extra "
                f"(e.g. {extra[:5]}){' or repeated' if got == reference else ''}; every member "
                "must log the same training set with the same data ids"
            )


def member_weights(count: int, weights: Sequence[float] | Tensor | None) -> list[float]:
    """``[1/K] * K`` for ``None`` (the mean), else ``weights`` checked: K finite values ≥ 0, not
    all zero (TracIn-CP: the learning rate of each checkpoint)."""
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(values) != count:
        raise ValueError(f"got {len(values)} weights for {count} members: pass one per member")
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(
            f"ensemble weights must be finite and ≥ 0 (a mean or learning rates), got {values}"
        )
    if sum(values) == 0:
        raise ValueError("ensemble weights are all zero: every score would be 0")
    return values


def _rows_for(train: Rows | LogStore, ids: Any) -> dict[str, Tensor]:
    """A member's rows of the given data ids, in that order."""
    if isinstance(train, Mapping):
        index = torch.as_tensor(ids)
        return {n: v[index] for n, v in train.items()}
    return train.read(ids)


def _aligned_chunks(members: Sequence[Member], chunk_rows: int) -> Iterator[list[Chunk]]:
    """Per chunk of the first member's rows, every member's rows of the same ids."""
    for chunk in iter_rows(members[0].train, chunk_rows):
        others = [Chunk(chunk.ids, _rows_for(m.train, chunk.ids)) for m in members[1:]]
        yield [chunk, *others]


def ensemble_influence_chunks(
    queries: Sequence[Rows],
    members: Sequence[Member],
    *,
    weights: Sequence[float] | Tensor | None = None,
    chunk_rows: int = 4096,
) -> Iterator[tuple[Any, Float[Tensor, "queries n"]]]:
    """Yield ``(ids [n], Σ_k w_k scores_k [Q, n])`` chunk by chunk (ids in the first member's
    order); ``queries[k]`` are the query rows of member ``k``'s model and spec."""
    members = [m if isinstance(m, Member) else Member(*m) for m in members]
    check_members(members, queries)
    w = member_weights(len(members), weights)
    conditioned = []
    for query, member in zip(queries, members, strict=True):
        pre = member.preconditioner or IdentityPreconditioner()
        done = pre({n: v.float() for n, v in query.items()})
        conditioned.append({n: flat(done, n) for n in done})
    for chunks in _aligned_chunks(members, chunk_rows):
        total = None
        for weight, query, chunk in zip(w, conditioned, chunks, strict=True):
            scores = {n: q @ flat(chunk.rows, n).T for n, q in query.items()}
            check_scores(chunk, scores)
            part = weight * sum(scores.values())
            total = part if total is None else total + part
        yield chunks[0].ids, total


def ensemble_influence(
    queries: Sequence[Rows],
    members: Sequence[Member],
    *,
    weights: Sequence[float] | Tensor | None = None,
    chunk_rows: int = 4096,
) -> Float[Tensor, "queries train"]:
    """Combined scores ``[Q, N]``: ``Σ_k w_k · influence(queries[k], members[k].train,
    preconditioner=members[k].preconditioner)``, columns in the first member's row order.

    ``weights=None`` is the mean over members (TRAK); pass learning rates for TracIn-CP.
    """
    parts = [
        s
        for _, s in ensemble_influence_chunks(
            queries, members, weights=weights, chunk_rows=chunk_rows
        )
    ]
    return torch.cat(parts, 1)


def ensemble_top_k(
    queries: Sequence[Rows],
    members: Sequence[Member],
    k: int,
    *,
    weights: Sequence[float] | Tensor | None = None,
    largest: bool = True,
    chunk_rows: int = 4096,
) -> TopK:
    """The ``k`` best training rows per query under the combined scores, streamed."""
    stream = ensemble_influence_chunks(queries, members, weights=weights, chunk_rows=chunk_rows)
    return top_k(stream, k, largest=largest)


def ensemble_self_influence(
    members: Sequence[Member],
    *,
    weights: Sequence[float] | Tensor | None = None,
    chunk_rows: int = 4096,
) -> Float[Tensor, " train"]:
    """``Σ_k w_k k_k(t, t)`` for every training row ``[N]``, in the first member's row order
    (``store.ids()`` of its store)."""
    members = [m if isinstance(m, Member) else Member(*m) for m in members]
    check_members(members)
    w = member_weights(len(members), weights)
    out = []
    for chunks in _aligned_chunks(members, chunk_rows):
        total = None
        for weight, member, chunk in zip(w, members, chunks, strict=True):
            values = self_kernel(chunk.rows, member.preconditioner or IdentityPreconditioner())
            check_scores(chunk, {"self": values})
            total = weight * values if total is None else total + weight * values
        out.append(total)
    return torch.cat(out)


def fit_members(
    models: Sequence[tuple[nn.Module, Mapping[str, Tensor]]],
    loader: Any,
    specs: Any,
    root: str,
    *,
    method: str = "auto",
    fisher: Fisher = "auto",
    damping: float | None = None,
    loss_fn: Any = None,
    ids: IdsFn | None = None,
    progress: bool = True,
) -> list[Member]:
    """Log and fit every member, resuming what a previous run left: the pipeline of an ensemble.

    Member ``k`` (``models[k] = (model, params)``, spec ``specs[k]`` or one spec for all) logs
    ``loader`` to ``{root}/member-{k}/rows`` with :func:`~logix_func.log_dataset` (committed
    rows are skipped) and fits its curvature with :func:`~logix_func.fit_curvature`, cached under
    ``{root}/member-{k}/curvature`` (found again only for the same weights, spec, loss, method,
    Fisher and data).
    ``loader`` must yield the same batches every pass (no shuffling); ``ids`` names its
    examples as in :func:`~logix_func.log_dataset` (default: dataset indices of a
    DataLoader). Returns the members with ``preconditioner(factors, damping)``.
    """
    if len(models) == 0:
        raise ValueError("fit_members needs at least one (model, params) pair")
    per_member = list(specs) if isinstance(specs, (list, tuple)) else [specs] * len(models)
    if len(per_member) != len(models):
        raise ValueError(f"got {len(per_member)} specs for {len(models)} models")
    members = []
    for k, ((model, params), spec) in enumerate(zip(models, per_member, strict=True)):
        base = f"{root.rstrip('/')}/member-{k}"
        store = log_dataset(
            model, params, loader, spec, f"{base}/rows", loss_fn=loss_fn, ids=ids, progress=progress
        )
        factors = fit_curvature(
            model,
            params,
            loader,
            spec,
            method=method,
            fisher=fisher,
            loss_fn=loss_fn,
            progress=progress,
            cache=f"{base}/curvature",
        )
        members.append(Member(store, preconditioner(factors, damping)))
    return members
