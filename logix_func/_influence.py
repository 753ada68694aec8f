"""Influence scores, self-influence and top-k, streamed over training rows in chunks.

Rows are ``{layer: [N, k_out, k_in]}`` gradients (projected or full), in memory or in a
:class:`~logix_func.LogStore`. With ``P`` the preconditioner (≈ H⁻¹ of the mean training loss),
``k(q, t) = Σ_layers ⟨P g_q, g_t⟩``: positive means training example t *helps* query q (removing
it raises q's loss by ≈ k(q, t) / N). Scores are not divided by N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import reduce
from typing import Any, Literal, NamedTuple

import tensorstore as ts
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ._origin import Provenance, check_provenance, store_provenance
from ._version import __version__
from .curvature import IdentityPreconditioner
from .store.scores import create_scores, open_scores, scores_attrs, write_columns
from .typing import Rows

Mode = Literal["dot", "cosine", "l2", "relative"]
Precondition = Callable[[dict[str, Tensor]], dict[str, Tensor]]
_MODES = ("dot", "cosine", "l2", "relative")


class Chunk(NamedTuple):
    """One slice of training rows: their data ids ``[n]`` and rows ``{layer: [n, ...]}``."""

    ids: Tensor | list
    rows: dict[str, Tensor]


def iter_rows(train: Any, chunk_rows: int | None) -> Iterator[Chunk]:
    """Chunks of ``train``: a rows dict (ids ``0..N-1``) or a store (its own chunks and ids;
    a store holding an id twice is refused). ``chunk_rows``: see :func:`chunk_size`."""
    chunk_rows = chunk_size(train, chunk_rows)
    if isinstance(train, Mapping):
        n = num_rows(train)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            yield Chunk(torch.arange(start, stop), {k: v[start:stop] for k, v in train.items()})
    else:
        train.check_unique()
        for ids, rows in train.iter_chunks(chunk_rows=chunk_rows):
            yield Chunk(ids, rows)


def chunk_size(train: Any, chunk_rows: int | None) -> int:
    """Training rows per matmul: ``chunk_rows``, or by default a store's own chunk size (each
    read is then one stored chunk, scored at once), 4096 for rows in memory."""
    if chunk_rows is not None:
        return chunk_rows
    return 4096 if isinstance(train, Mapping) else train.schema.chunk_rows


def num_rows(rows: Any) -> int:
    if isinstance(rows, Mapping):
        sizes = {v.shape[0] for v in rows.values()}
        if len(sizes) != 1:
            raise ValueError(f"rows disagree on their number: {sorted(sizes)}")
        return sizes.pop()
    return len(rows)


def check_compatible(query: Rows, train: Any) -> None:
    expected = (
        {k: tuple(v.shape[1:]) for k, v in train.items()}
        if isinstance(train, Mapping)
        else {k: tuple(s) for k, s in train.schema.layers.items()}
    )
    got = {k: tuple(v.shape[1:]) for k, v in query.items()}
    if set(got) != set(expected):
        raise ValueError(
            f"query layers {sorted(got)} do not match the training rows' layers {sorted(expected)}"
        )
    for name, shape in got.items():
        if shape != expected[name]:
            raise ValueError(
                f"layer {name!r}: query rows have shape {shape}, training rows {expected[name]} "
                "(computed with another projection?)"
            )


def check_sources(
    query: Provenance | None, train: Any, preconditioner: Any, what: str = "training rows"
) -> None:
    """Refuse query rows, training rows (a store records its provenance) and a preconditioner
    (its factors' provenance) that come from different specs or weights, naming both sides."""
    if query is not None and not (
        isinstance(query, Mapping) and set(query) <= {"spec", "weights", "loss"}
    ):
        raise TypeError(
            "query_provenance must be a provenance dict, lf.provenance(model, params, spec), "
            f"got {query!r}"
        )
    sides: dict[str, Provenance | None] = {"the query rows": query}
    if getattr(train, "schema", None) is not None:
        sides[f"the {what} of the store at {train.url}"] = store_provenance(train)
    sides["the preconditioner's curvature factors"] = getattr(preconditioner, "provenance", None)
    check_provenance(sides)


def check_finite(chunk: Chunk, what: str = "training") -> None:
    for name, v in chunk.rows.items():
        bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)
        if bad.any():
            ids = [chunk.ids[i] for i in bad.nonzero().flatten().tolist()]
            ids = [int(i) if isinstance(i, Tensor) else i for i in ids]
            raise ValueError(f"non-finite {what} rows in layer {name!r} for data ids {ids[:10]}")


def check_scores(chunk: Chunk, scores: dict[str, Tensor]) -> None:
    """A NaN or inf in a row makes its score column non-finite: look for bad ids only then."""
    if all(bool(torch.isfinite(v).all()) for v in scores.values()):
        return
    check_finite(chunk)
    raise ValueError("non-finite influence scores from finite rows: the values overflow float32")


def flat(rows: Rows, name: str) -> Tensor:
    v = rows[name]
    return v.reshape(v.shape[0], -1).float()


def self_kernel(rows: Rows, pre: Precondition) -> Tensor:
    conditioned = pre({k: v.float() for k, v in rows.items()})
    return sum((flat(conditioned, k) * flat(rows, k)).sum(1) for k in rows)


def influence_chunks(
    query: Rows,
    train: Any,
    *,
    preconditioner: Precondition | None = None,
    mode: Mode = "dot",
    chunk_rows: int | None = None,
    per_layer: bool = False,
    progress: bool | None = None,
    query_provenance: Provenance | None = None,
) -> Iterator[tuple[Any, Tensor | dict[str, Tensor]]]:
    """Yield ``(ids [n], scores [Q, n])`` per chunk (``{layer: [Q, n]}`` with ``per_layer``)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if per_layer and mode != "dot":
        raise ValueError("per_layer scores sum to the total only in mode 'dot'")
    check_sources(query_provenance, train, preconditioner)
    check_compatible(query, train)
    total = num_rows(train)
    if total == 0:
        raise ValueError("the training rows are empty: nothing to score against")
    pre = preconditioner or IdentityPreconditioner()
    check_finite(Chunk(list(range(num_rows(query))), dict(query)), "query")
    conditioned = pre(dict(query))
    conditioned = {k: flat(conditioned, k) for k in conditioned}
    q_self = self_kernel(query, pre) if mode in ("cosine", "l2") else None
    show = total > 50_000 if progress is None else progress
    bar = tqdm(total=total, desc="influence", unit="row", disable=not show)
    for chunk in iter_rows(train, chunk_rows):
        layer_scores = {k: conditioned[k] @ flat(chunk.rows, k).T for k in conditioned}
        check_scores(chunk, layer_scores)
        bar.update(len(chunk.ids))
        if per_layer:
            yield chunk.ids, layer_scores
            continue
        scores = reduce(torch.add, layer_scores.values())
        if mode != "dot":
            t_self = self_kernel(chunk.rows, pre)
            if mode == "cosine":
                scores = scores / (q_self[:, None] * t_self[None, :]).clamp_min(1e-30).sqrt()
            elif mode == "l2":
                scores = -(q_self[:, None] - 2 * scores + t_self[None, :])
            else:
                scores = scores / t_self.clamp_min(1e-30).sqrt()[None, :]
        yield chunk.ids, scores
    bar.close()


def influence(
    query: Rows,
    train: Any,
    *,
    preconditioner: Precondition | None = None,
    mode: Mode = "dot",
    chunk_rows: int | None = None,
    per_layer: bool = False,
    progress: bool | None = None,
    out: str | Mapping[str, Any] | None = None,
    query_provenance: Provenance | None = None,
) -> Float[Tensor, "queries train"] | dict[str, Float[Tensor, "queries train"]] | ts.TensorStore:
    """Scores ``[Q, N]`` of every training row for every query row.

    Scores of a store carry its data ids in column order as ``scores.ids`` (an attribute of
    the returned tensor, ``[N]`` or a list of str): :func:`top_k` returns those ids. A tensor
    computed from the scores (``scores * 2``, a slice) has no ``.ids``: pass ``ids=``.

    Args:
        query: ``{layer: [Q, k_out, k_in]}`` gradients of the query examples.
        train: ``{layer: [N, k_out, k_in]}`` rows, or a LogStore.
        preconditioner: applied once to the query side (``None`` = identity).
        mode: ``"dot"`` k(q,t); ``"cosine"`` k(q,t)/√(k(q,q)k(t,t)); ``"l2"`` −‖q−t‖²_P;
            ``"relative"`` (RelatIF) k(q,t)/√k(t,t).
        chunk_rows: training rows scored per matmul; ``None``: a store's own chunk size (its
            stored chunks are read once whatever the size), 4096 for rows in memory.
        per_layer: return ``{layer: [Q, N]}`` whose sum is the total (mode ``"dot"``).
        progress: show a progress bar (default: for more than 50,000 rows).
        out: a local path, tensorstore URL or kvstore spec: write the scores there chunk by
            chunk (a float32 zarr3 array ``[Q, N]``, columns in the order of ``train``'s rows,
            e.g. ``store.ids()``; :func:`top_k` reads it back) instead of holding them in
            memory; returns the opened array. The URL must hold nothing yet: existing data
            is never replaced. The array's attributes record the mode and the provenance of
            the query, the store and the preconditioner (``attributes["logix_func"]["scores"]``).
        query_provenance: what produced the query rows, ``lf.provenance(model, params, spec,
            loss_fn=...)``: checked against the store's and the preconditioner's spec and
            weights. A store and a preconditioner are always checked against each other.
    """
    stream = influence_chunks(
        query,
        train,
        preconditioner=preconditioner,
        mode=mode,
        chunk_rows=chunk_rows,
        per_layer=per_layer,
        progress=progress,
        query_provenance=query_provenance,
    )
    if out is not None:
        if per_layer:
            raise ValueError("out= writes total scores; per_layer results are returned in memory")
        origin = {
            "mode": mode,
            "query": query_provenance,
            "train": store_provenance(train) if hasattr(train, "schema") else None,
            "train_url": getattr(train, "url", None),
            "preconditioner": getattr(preconditioner, "provenance", None),
        }
        rows = (num_rows(query), num_rows(train))
        return _write_scores(out, stream, *rows, chunk_size(train, chunk_rows), origin)
    parts = list(stream)
    if per_layer:
        return {k: torch.cat([s[k] for _, s in parts], 1) for k in parts[0][1]}
    scores = torch.cat([s for _, s in parts], 1)
    if not isinstance(train, Mapping):  # the columns' data ids, for top_k
        chunks = [ids for ids, _ in parts]
        is_tensor = isinstance(chunks[0], Tensor)
        scores.ids = torch.cat(chunks) if is_tensor else [i for c in chunks for i in c]
    return scores


def _write_scores(
    url: str,
    stream: Iterator[tuple[Any, Tensor]],
    queries: int,
    total: int,
    chunk_rows: int,
    origin: dict[str, Any],
) -> ts.TensorStore:
    """Write ``[Q, n]`` score chunks into a new float32 zarr3 array ``[Q, N]`` at ``url``,
    whose attributes record ``origin`` (what produced the scores)."""
    array = create_scores(
        url, queries, total, chunk_rows, {"scores": origin, "version": _version()}
    )
    write_columns(array, (scores for _, scores in stream))
    return array


def _stored_scores(
    scores: ts.TensorStore | str | Mapping[str, Any], ids: Tensor | list | None
) -> Iterator[tuple[Any, Tensor]]:
    """``(ids, [Q, n])`` chunks of an array written by ``influence(..., out=)``."""
    if not isinstance(scores, ts.TensorStore):
        scores = open_scores(scores)
    origin = scores_attrs(scores).get("scores", {})
    total = scores.shape[1]
    if ids is None and origin.get("train_url") is not None:
        from .store import LogStore

        store = LogStore.open(origin["train_url"])
        if len(store) != total:
            raise ValueError(
                f"these scores have {total} columns, the store they score ({store.url}) now has "
                f"{len(store)} rows: it gained rows since, so its ids no longer name the "
                "columns. Pass ids= (the store's ids when it was scored), or score it again"
            )
        ids = store.ids()
    if ids is None:
        ids = torch.arange(total)
    width = scores.chunk_layout.read_chunk.shape[1]
    for start in range(0, total, width):
        stop = min(start + width, total)
        block = torch.from_numpy(scores[:, start:stop].read().result())
        yield ids[start:stop], block


def _version() -> str:
    return __version__


def self_influence(
    train: Any,
    *,
    preconditioner: Precondition | None = None,
    chunk_rows: int | None = None,
    progress: bool | None = None,
    cache: str | Mapping[str, Any] | None = None,
) -> Float[Tensor, " train"]:
    """``k(t, t)`` for every training row: ``[N]``, streamed chunk by chunk (a store and the
    preconditioner must come from the same spec and weights).

    ``cache`` (a folder, URL or kvstore spec; ``train`` a LogStore): values saved there by an
    earlier call are loaded instead of rescanning the store when the store (location,
    creation time, provenance, ids) and the preconditioner (its factors' provenance and
    damping) are the same; else they are computed and saved beside the others.
    """
    if cache is not None:
        from ._cache import cached, self_influence_record

        record = self_influence_record(train, preconditioner)
        scan = lambda: self_influence(  # noqa: E731
            train, preconditioner=preconditioner, chunk_rows=chunk_rows, progress=progress
        )
        return cached(cache, "self-influence", record, scan)
    check_sources(None, train, preconditioner)
    pre = preconditioner or IdentityPreconditioner()
    total = num_rows(train)
    if total == 0:
        raise ValueError("the training rows are empty")
    show = total > 50_000 if progress is None else progress
    out = []
    with tqdm(total=total, desc="self-influence", unit="row", disable=not show) as bar:
        for chunk in iter_rows(train, chunk_rows):
            values = self_kernel(chunk.rows, pre)
            check_scores(chunk, {"self": values})
            out.append(values)
            bar.update(len(chunk.ids))
    return torch.cat(out)


class TopK(NamedTuple):
    """Best ``k`` training rows per query: data ids and scores, both ``[Q, k]``."""

    ids: Int[Tensor, "queries k"] | list
    values: Float[Tensor, "queries k"]


def top_k(
    scores: Tensor | Iterable[tuple[Any, Tensor]] | ts.TensorStore | str | Mapping[str, Any],
    k: int,
    *,
    largest: bool = True,
    ids: Tensor | list | None = None,
) -> TopK:
    """The ``k`` largest (proponents) or smallest (opponents, ``largest=False``) scores per query.

    ``scores`` is one of:

    - a ``[Q, N]`` tensor: the ids are ``ids``, else the ``scores.ids`` that :func:`influence`
      attaches to the scores of a store, else positions ``0..N-1``;
    - the array :func:`influence` wrote with ``out=``, or its location: read chunk by chunk,
      never rescoring; the ids are ``ids``, else those of the store it records (refused if
      that store has gained rows since), else positions;
    - a stream of ``(ids, [Q, n])`` chunks such as :func:`influence_chunks`, merged chunk by
      chunk so that the full matrix never has to fit in memory.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (how many rows per query), got {k!r}")
    if isinstance(scores, Tensor):
        ids = getattr(scores, "ids", None) if ids is None else ids
        stream = [(torch.arange(scores.shape[1]) if ids is None else ids, scores)]
    elif isinstance(scores, (ts.TensorStore, str, Mapping)):
        stream = _stored_scores(scores, ids)
    else:
        stream = scores
    best_values: Tensor | None = None
    best_pos: Tensor | None = None
    seen: list = []
    offset = 0
    for chunk_ids, chunk in stream:
        nan = torch.isnan(chunk)
        if nan.any():
            q, col = nan.nonzero()[0].tolist()
            raise ValueError(
                f"top_k got NaN scores (query {q}, training row {offset + col}): a NaN has no "
                "rank. Find the rows that produce it (influence refuses non-finite rows) "
                "before ranking"
            )
        pos = torch.arange(offset, offset + chunk.shape[1]).expand(chunk.shape[0], -1)
        offset += chunk.shape[1]
        seen.append(chunk_ids)
        if best_values is not None:
            chunk, pos = torch.cat([best_values, chunk], 1), torch.cat([best_pos, pos], 1)
        kk = min(k, chunk.shape[1])
        best_values, where = chunk.topk(kk, dim=1, largest=largest)
        best_pos = pos.gather(1, where)
    if best_values is None:
        raise ValueError("top_k got no scores")
    if offset < k:
        raise ValueError(f"k={k} is larger than the number of training rows ({offset})")
    if all(isinstance(c, Tensor) for c in seen):
        return TopK(torch.cat(seen)[best_pos], best_values)
    seen_ids = [i for c in seen for i in c]
    return TopK([[seen_ids[p] for p in row] for row in best_pos.tolist()], best_values)
