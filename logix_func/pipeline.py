"""The attribution pipeline over a data loader, built only from the public pieces.

``log_dataset`` appends projected gradients of every example to a store (resuming where a
previous run stopped); ``fit_curvature`` runs the curvature passes (by default the per-layer
GGN where it fits and the Fisher is exact, KFAC and EKFAC elsewhere) and returns factors;
``query_grads`` gives the query rows, of a measurement that may differ from the training loss.
Both take a ``torch.distributed`` process group: each rank then handles the batches
:func:`~logix_func.distributed.rank_batches` gives it, and the results equal a single process's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._batch import ModelBatch
from ._cache import cached, curvature_record
from ._capture import capture_shapes
from ._fisher import LabelSampler, exact_draws, fisher_logs, resolved_fisher
from ._ids import indexed_loader
from ._origin import loss_name, stamped, weights_fingerprint
from ._projected_grads import projected_grads
from .curvature import dual_ggn, ekfac, joint_ggn, kfac, raw
from .curvature._kfac import Fisher
from .curvature.transform import CurvatureFactors, CurvatureLogs, Transform, alongside
from .distributed import (
    Group,
    all_reduce_state,
    broadcast_state,
    local_model,
    rank_batches,
    rank_world,
)
from .store import LogStore, NotAStoreError, StoreSchema, model_fingerprint
from .store.kvstore import Location
from .typing import Rows, Spec

IdsFn = Callable[[Any, int], Tensor | list]
Method = Literal["kfac", "ekfac", "raw", "ggn", "joint_ggn", "dual_ggn", "auto"]


def position_ids(batch: Any, offset: int) -> Tensor:
    """Data ids = positions in the loader's order: ``log_dataset(..., ids=position_ids)`` for an
    unshuffled iterable of batches such as a list (the default ids need a DataLoader). Logging
    a second iterable into the same store needs other ids: its positions repeat."""
    return torch.arange(offset, offset + ModelBatch.from_batch(batch).size)


def rank_total(loader: Iterable[Any], group: Group) -> int | None:
    """How many batches of ``loader`` this rank handles, or None if the loader has no length."""
    if not hasattr(loader, "__len__"):
        return None
    rank, world = rank_world(group)
    return len(range(rank, len(loader), world))


def take(batch: Any, index: Tensor) -> Any:
    """The samples of ``batch`` at ``index`` (every tensor leaf indexed on its first axis)."""
    pick = lambda v: v[index] if isinstance(v, Tensor) else v  # noqa: E731
    if isinstance(batch, Mapping):
        return {k: pick(v) for k, v in batch.items()}
    inputs, targets = batch
    inputs = tuple(pick(v) for v in inputs) if isinstance(inputs, (tuple, list)) else pick(inputs)
    return (inputs, pick(targets))


def store_schema(
    model: nn.Module,
    spec: Spec,
    dtype: torch.dtype = torch.float32,
    *,
    captures: Mapping[str, Mapping[str, Tensor]] | None = None,
    params: Mapping[str, Tensor] | None = None,
    loss_fn: Any = None,
) -> StoreSchema:
    """The schema of a store of ``spec``'s projected gradients of ``model`` (with ``params``
    over its own weights, and ``loss_fn``), and of the entries ``"name.kind"`` of ``captures``
    (an example :func:`~logix_func._capture.capture` result). It records the spec, the
    weights fingerprint and the loss name: rows of other weights are refused."""
    layers = spec.dims()
    if captures is not None:
        extra = capture_shapes(captures)
        clash = sorted(set(extra) & set(layers))
        if clash:
            raise ValueError(f"captured entries {clash} have the names of gradient layers")
        layers = {**layers, **extra}
    return StoreSchema(
        layers=layers,
        dtype=dtype,
        spec=spec.to_dict(),
        fingerprint=model_fingerprint(model),
        weights=weights_fingerprint(model, params),
        loss=loss_name(loss_fn),
    )


def check_store(store: LogStore, schema: StoreSchema) -> None:
    """``store`` must hold rows of ``schema``'s spec, weights and loss, to take more of them."""
    theirs, ours = store.schema, schema
    if theirs.spec != ours.spec:
        raise ValueError(
            f"the store at {store.url} was written with another projection spec; "
            "log to a new store or use the spec it records (ProjectionSpec.from_dict)"
        )
    if theirs.weights != ours.weights:
        found = (
            f"weights {theirs.weights}"
            if theirs.weights
            else "no weights fingerprint (it was written before stores recorded one)"
        )
        raise ValueError(
            f"the store at {store.url} holds rows of {found}, these are weights "
            f"{ours.weights}: rows of other weights cannot share a store (their scores would "
            "be mixed silently). Log to a new store, e.g. one keyed by the fingerprint: "
            f"f'runs/train-{{lf.weights_fingerprint(model, params)}}'"
        )
    if theirs.loss != ours.loss:
        raise ValueError(
            f"the store at {store.url} holds gradients of loss {theirs.loss!r}, these are of "
            f"{ours.loss!r}: log them to a new store"
        )


def open_store(url: str, schema: StoreSchema, rank: int) -> LogStore:
    """The store at ``url`` (created with ``schema`` if absent), checked, open as ``rank``."""
    try:
        existing = LogStore.open(url)
    except NotAStoreError:
        existing = None
    if existing is not None:
        check_store(existing, schema)
    return LogStore.create(url, schema, writer=rank, exist_ok=True)


def log_dataset(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loader: Iterable[Any],
    spec: Spec,
    store: LogStore | Location,
    *,
    loss_fn: Any = None,
    ids: IdsFn | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    group: Group = None,
) -> LogStore:
    """Append the projected gradient of every example of ``loader`` to ``store``.

    ``store`` is an open LogStore or a URL (created with :func:`store_schema` if absent). A
    store holds rows of one spec, set of weights and loss: another one is refused.
    Examples whose data id is already committed are skipped, so a rerun after a crash resumes
    without duplicates or gaps, and a store grows by logging new examples into it.

    ``ids(batch, offset)`` names the examples of a batch (ints, or strings: a store created
    here for string ids, e.g. ``ids=lambda batch, offset: batch["name"]``, holds string ids,
    at most 64 UTF-8 bytes each). By default, for a ``DataLoader``
    over a map-style dataset, the ids are the dataset indices its sampler picks (under
    ``Subset``/``random_split`` wrappers: indices into the dataset beneath), right under
    shuffling, and every example is logged even with ``drop_last=True``; other iterables
    need ``ids``. Non-finite rows are refused before they are stored. Returns the store,
    flushed; given a URL, the store it opened is closed (giving its writer id up) and returned
    reopened for reading.

    With a process ``group`` every rank passes the same loader and logs its batches
    (``i % world == rank``) as writer ``rank`` of the store; the ranks then wait for each other,
    so the returned store shows every rank's rows. A DDP-wrapped model is unwrapped.
    """
    model = local_model(model)
    rank, world = rank_world(group)
    if ids is None:
        loader = _indexed(loader)
    schema = store_schema(model, spec, dtype, params=params, loss_fn=loss_fn)
    total = rank_total(loader, group)
    if ids is None and world == 1:  # no split: rank_batches would count (ids, batch) pairs
        mine = ((i, None, batch) for i, batch in enumerate(loader))
    else:
        mine = rank_batches(loader, group)
    opened = not isinstance(store, LogStore)
    if opened:
        if ids is not None:  # string ids make a store of string ids
            first = next(mine, None)
            mine = itertools.chain([] if first is None else [first], mine)
            if first is not None and _strings(ids(first[2], first[1])):
                schema = dataclasses.replace(schema, ids="str")
        store = open_store(store, schema, rank)  # checked there
    else:
        check_store(store, schema)
    done = store.committed_ids()
    try:
        for _, offset, batch in tqdm(
            mine, total=total, desc="logging", unit="batch", disable=not progress
        ):
            _log_batch(model, params, spec, store, batch, offset, ids, done, loss_fn, dtype)
    except Exception:
        with contextlib.suppress(Exception):  # the error to report is the first one
            store.flush()  # the finished batches' rows are right: commit them
        if opened:  # give the writer id up: the caller holds no handle to close
            with contextlib.suppress(Exception):
                store.close()
        raise
    store.flush()
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)
        store.refresh()
    if opened:
        store.close()
        store = LogStore.open(store.url)
    return store


def _log_batch(model, params, spec, store, batch, offset, ids, done, loss_fn, dtype) -> None:
    """Append the rows of the examples of ``batch`` not in ``done``."""
    if ids is None:
        batch_ids, batch = batch
    else:
        batch_ids = ids(batch, offset)
    keys = batch_ids.tolist() if isinstance(batch_ids, Tensor) else list(batch_ids)
    todo = [i for i, key in enumerate(keys) if key not in done]
    if not todo:
        return
    if len(todo) < len(keys):
        index = torch.tensor(todo)
        batch = take(batch, index)
        picked = [keys[i] for i in todo]
        batch_ids = batch_ids[index] if isinstance(batch_ids, Tensor) else picked
    rows = projected_grads(model, params, batch, spec, loss_fn=loss_fn)
    store.append(batch_ids, {k: v.to(dtype) for k, v in rows.items()})


def _strings(ids: Any) -> bool:
    return not isinstance(ids, Tensor) and any(isinstance(i, str) for i in ids)


def _indexed(loader: Iterable[Any]) -> Iterable[tuple[Tensor, Any]]:
    """``loader`` yielding ``(dataset ids, batch)``, or a refusal saying to pass ``ids``."""
    indexed = indexed_loader(loader)
    if indexed is None:
        raise ValueError(
            f"log_dataset cannot tell which examples a {type(loader).__name__} yields: default "
            "ids need a torch DataLoader over a map-style dataset with a batch size (ids = dataset "
            "indices). "
            "Pass ids=, e.g. ids=lambda batch, offset: lf.content_ids(batch[0]) (a hash of "
            "each example), or a dataset index you carry in the batch (lf.IndexedDataset)"
        )
    return indexed


def query_grads(
    model: nn.Module,
    params: Mapping[str, Tensor],
    queries: Iterable[Any],
    spec: Spec,
    *,
    measurement: Any = None,
    progress: bool = False,
) -> Rows:
    """Projected gradients ``{layer: [Q, k_out, k_in]}`` of the measurement of every query.

    ``queries`` is an iterable of batches (a loader, or a list of one batch).
    ``measurement(outputs, targets)`` is what is attributed, with ``loss_fn``'s signature and
    conventions: loss-like (lower is better) and computed per example, e.g. the negative
    log-likelihood of a completion only, or ``-margin``; ``None`` = the training loss. Scores
    ``influence(query_grads(...), store)`` are then positive where a training example lowers
    the measurement.
    """
    total = len(queries) if hasattr(queries, "__len__") else None
    parts = [
        projected_grads(model, params, batch, spec, loss_fn=measurement)
        for batch in tqdm(queries, total=total, desc="queries", unit="batch", disable=not progress)
    ]
    if not parts:
        raise ValueError("the query set is empty")
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


# Label seeds of the EKFAC pass, apart from the KFAC pass's seed + i (torch seeds its CPU generator
# with 32 bits: an offset of 2**32 would repeat the same draws).
EKFAC_SEED_OFFSET = 2**31
# method="auto" under the exact Fisher: the dense GGN for layers with k = k_out·k_in up to
# AUTO_GGN_MAX (its C is k² floats, 64 MiB at float32), smallest first while all the C together
# take at most AUTO_GGN_BUDGET bytes (1 GiB: 16 layers of the largest k); EKFAC for the others.
AUTO_GGN_MAX = 4096
AUTO_GGN_BUDGET = 2**30
# method="auto" where a layer is wider than that: the dual GGN of all layers when its rows
# R = samples × classes are at most AUTO_DUAL_ROWS (its R × R Cholesky factor: 2 GiB in float64)
AUTO_DUAL_ROWS = 16384


def fit_curvature(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loader: Iterable[Any],
    spec: Spec,
    *,
    method: Method = "auto",
    fisher: Fisher = "auto",
    seed: int = 0,
    loss_fn: Any = None,
    label_sampler: LabelSampler | None = None,
    progress: bool = True,
    group: Group = None,
    cache: Location | None = None,
) -> CurvatureFactors:
    """Curvature factors of ``model`` over ``loader`` (one pass; two for EKFAC).

    ``method``: ``"kfac"``, ``"ekfac"``, ``"raw"`` (covariance of the gradients under
    ``fisher``) or ``"ggn"``: the exact per-layer Gauss-Newton matrix in the projected space,
    ``(1/N) Σ_n Σ_c p_nc g_nc g_ncᵀ`` — ``raw(eigh=False)`` over the exact-Fisher logs,
    factors ``{"C": [k, k]}`` per layer (``k = k_out·k_in``: for small models or LoGra ranks
    up to ≈ 64) that :func:`~logix_func.preconditioner` solves through a Cholesky factor.
    For ``"ggn"``, ``fisher="auto"`` is the exact expectation where that is cheap (as for the
    other methods) and elsewhere, as ``"true"``, its one-draw Monte-Carlo estimate (language
    models); the empirical Fisher is not a GGN and is refused. ``"joint_ggn"``: the same
    Gauss-Newton matrix of *all* layers together, cross-layer blocks included
    (:func:`~logix_func.curvature.joint_ggn`: ``K²`` floats for ``K = Σ_l k_l``, one pass),
    solved jointly by the preconditioner. ``"dual_ggn"``: that matrix kept as its rows, the
    Fisher draws' gradients (:func:`~logix_func.curvature.dual_ggn`: ``R = N·D`` rows, solved
    in the ``R × R`` sample space), for full gradients of wide layers; with a ``group`` the
    ranks' rows are gathered. ``"auto"`` (the default): where the Fisher is the exact
    expectation over the labels (``fisher="exact"``, or ``"auto"`` resolving to it on the
    loader's first batch: ``(inputs, targets)`` batches, the default loss, few classes), the
    per-layer GGN (``"ggn"``) when every layer has ``k ≤ AUTO_GGN_MAX`` (4096: ``C`` ≤ 64 MiB)
    within ``AUTO_GGN_BUDGET`` (1 GiB for all ``C``); else the dual GGN of all layers when its
    rows, at most ``len(loader)`` × the first batch's size × classes, number at most
    ``AUTO_DUAL_ROWS`` (16384: a 2 GiB factor); else the GGN for the layers that fit, smallest
    first, and EKFAC for the others, whose second pass also accumulates the GGN layers.
    Elsewhere (sampled labels: language models, many classes, a ``label_sampler``; the
    empirical Fisher) it is exactly ``"ekfac"``. On the tuning set the GGN beats EKFAC (LDS 0.81
    vs 0.69, docs/validation.md).

    ``label_sampler``: with a custom ``loss_fn``, draws the labels for ``fisher="true"`` or
    ``"auto"`` (see :func:`~logix_func.fisher_logs`).

    ``fisher="auto"`` takes the exact expectation over the labels where that is cheap (few
    classes, see :func:`logix_func.fisher_logs`) and samples them elsewhere. Where labels are
    sampled, batch ``i`` draws them with seed ``seed + i`` in the KFAC pass and with
    ``seed + i + EKFAC_SEED_OFFSET`` in the EKFAC pass: the eigenvalues are re-estimated on
    draws independent of the ones the eigenbases were fitted to (the same draws bias them
    towards that sample's noise: LDS 0.48 instead of 0.56 on the digits MLP 64-128-128-10).

    With a process ``group`` every rank passes the same loader and accumulates its batches
    (``i % world == rank``, still seeded ``seed + i``); the states are summed over the ranks
    before finalizing, and the first rank's factors (KFAC's before the EKFAC pass too) are
    broadcast, so every rank returns those of a single process over the whole loader.

    The factors record the spec tag (``"spec"``), the weights fingerprint (``"weights"``) and
    the loss name (``"loss"``) they were fitted with; preconditioners check them.

    ``cache`` (a folder, URL or kvstore spec): factors saved there by an earlier call are
    loaded instead of refitted when the weights fingerprint, spec, loss name, method, Fisher,
    seed, label sampler's name, the data (a hash of every batch, one pass without the
    model) and, for ``"auto"``, the method and GGN layers it resolves to all match; else they
    are fitted and saved beside the others (see :mod:`logix_func._cache`).
    """
    model = local_model(model)
    resolved, rows = fisher, None
    if method == "auto":  # the GGN only under the exact expectation: resolve it up front
        if iter(loader) is loader:
            raise TypeError(
                "fit_curvature(method='auto') reads the first batch before its passes (to "
                "resolve the Fisher): pass a DataLoader or a list of batches, not a one-shot "
                f"{type(loader).__name__}"
            )
        first = next(iter(loader), None)
        if first is not None:
            options = dict(loss_fn=loss_fn, label_sampler=label_sampler)
            resolved = resolved_fisher(model, params, first, fisher, **options)
            if resolved == "exact" and hasattr(loader, "__len__"):
                size = ModelBatch.from_batch(first).size
                rows = len(loader) * size * exact_draws(model, params, first)
    if cache is not None:
        options = dict(
            method=method, fisher=fisher, seed=seed, loss_fn=loss_fn, label_sampler=label_sampler
        )
        record = curvature_record(model, params, loader, spec, **options)
        if method == "auto":  # what the rule chose: a changed rule is another entry
            chosen, ggn_layers = auto_method(spec, resolved, rows)
            record["auto"] = {"method": chosen, "ggn_layers": ggn_layers}
        fit = lambda: fit_curvature(  # noqa: E731
            model, params, loader, spec, progress=progress, group=group, **options
        )
        return cached(cache, f"curvature-{method}", record, fit)
    device = next(iter(params.values())).device
    stages = curvature_stages(spec, method, resolved, rows)

    def passes(desc: str, offset: int) -> Iterator[CurvatureLogs]:
        batches = rank_batches(loader, group)
        total = rank_total(loader, group)
        bar = tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress)
        for i, _, batch in bar:
            yield CurvatureLogs(
                *fisher_logs(
                    model,
                    params,
                    batch,
                    spec,
                    fisher=fisher,
                    seed=seed + i + offset,
                    loss_fn=loss_fn,
                    label_sampler=label_sampler,
                )
            )

    factors = None
    for stage in stages:
        transform = stage.build(factors)
        state = transform.init(spec, device)
        for logs in passes(stage.desc, stage.seed_offset):
            state = transform.update(state, logs)
        factors = broadcast_state(transform.finalize(all_reduce_state(state, group)), group)
    return stamped(factors, model, params, loss_fn)


class Stage(NamedTuple):
    """One pass of :func:`fit_curvature` over the loader: its progress label, its transform
    built from the previous stage's factors (``None`` for the first) and its label-seed offset."""

    desc: str
    build: Callable[[CurvatureFactors | None], Transform]
    seed_offset: int = 0


def auto_ggn_layers(dims: Mapping[str, tuple[int, int]]) -> list[str]:
    """The layers ``method="auto"`` gives a dense GGN block: ``k = k_out·k_in ≤ AUTO_GGN_MAX``,
    smallest ``k`` first while the blocks' ``Σ 4 k²`` bytes stay within ``AUTO_GGN_BUDGET``."""
    sizes = sorted((o * i, n) for n, (o, i) in dims.items() if o * i <= AUTO_GGN_MAX)
    taken, total = [], 0
    for k, name in sizes:
        total += 4 * k * k
        if total > AUTO_GGN_BUDGET:
            break
        taken.append(name)
    return [n for n in dims if n in taken]


def auto_method(spec: Spec, fisher: Fisher, rows: int | None) -> tuple[str, list[str]]:
    """``method="auto"``'s choice: ``(method, ggn_layers)``, the layers fitted as the per-layer
    GGN alongside EKFAC. Under ``fisher="exact"``: ``("ggn", [])`` when every layer fits
    (`auto_ggn_layers`), else ``("dual_ggn", [])`` when its ``rows`` (``None``: unknown) number
    at most ``AUTO_DUAL_ROWS``, else ``("ekfac", the layers that fit)``; otherwise
    ``("ekfac", [])``."""
    if fisher != "exact":
        return "ekfac", []
    dims = spec.dims()
    dense = auto_ggn_layers(dims)
    if len(dense) == len(dims):
        return "ggn", []
    if rows is not None and rows <= AUTO_DUAL_ROWS:
        return "dual_ggn", []
    return "ekfac", dense


def curvature_stages(
    spec: Spec, method: Method, fisher: Fisher, rows: int | None = None
) -> list[Stage]:
    """The passes ``fit_curvature(method=..., fisher=...)`` makes: ``"kfac"`` one, ``"ekfac"``
    KFAC then EKFAC (with ``"auto"``'s GGN layers riding along in the second), ``"raw"``,
    ``"ggn"``, ``"joint_ggn"`` and ``"dual_ggn"`` one pass. ``"auto"`` takes GGN layers only
    under ``fisher="exact"`` (:func:`fit_curvature` passes ``"auto"`` resolved on the first
    batch): all per layer where they fit, else the dual GGN where its ``rows`` (at most
    ``samples × classes``; ``None``: unknown) fit, else EKFAC with the GGN layers alongside."""
    dense: list[str] = []
    if method == "auto":
        method, dense = auto_method(spec, fisher, rows)
    if method in ("ggn", "joint_ggn", "dual_ggn") and fisher == "empirical":
        raise ValueError(
            f"method={method!r} needs the model's own label distribution: use fisher='auto' "
            "(default), 'exact' or 'true'; for the empirical Fisher's covariance use method='raw'"
        )
    if method in ("raw", "ggn"):
        return [Stage(f"{method} covariance", lambda _: raw(eigh=method == "raw"))]
    if method == "joint_ggn":
        return [Stage("joint GGN", lambda _: joint_ggn())]
    if method == "dual_ggn":
        return [Stage("dual GGN", lambda _: dual_ggn())]
    if method not in ("kfac", "ekfac"):
        raise ValueError(
            "method must be 'kfac', 'ekfac', 'raw', 'ggn', 'joint_ggn', 'dual_ggn' or 'auto', "
            f"got {method!r}"
        )
    stages = [Stage("KFAC", lambda _: kfac(fisher))]
    if method == "ekfac":

        def second(factors: CurvatureFactors | None) -> Transform:
            if not dense:
                return ekfac(factors)
            pick = lambda d: {n: d[n] for n in dense if n in d}  # noqa: E731
            # the GGN layers' own spec: only their C is allocated
            sub = dataclasses.replace(spec, layers=pick(spec.layers), pca=pick(spec.pca))
            return alongside(ekfac(factors), raw(eigh=False), sub)

        stages.append(Stage("EKFAC", second, EKFAC_SEED_OFFSET))
    return stages
