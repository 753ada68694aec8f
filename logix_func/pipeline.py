"""The attribution pipeline over a data loader, built only from the public pieces.

``log_dataset`` appends projected gradients of every example to a store (resuming where a
previous run stopped); ``fit_curvature`` runs the KFAC (and EKFAC) passes and returns factors.
Both take a ``torch.distributed`` process group: each rank then handles the batches
:func:`~logix_func.distributed.rank_batches` gives it, and the results equal a single process's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batch import ModelBatch
from .capturing import capture_shapes
from .curvature import ekfac, fisher_logs, kfac, raw
from .curvature.kfac import Fisher
from .curvature.transform import layer_dims
from .distributed import (
    Group,
    all_reduce_state,
    broadcast_state,
    local_model,
    rank_batches,
    rank_world,
)
from .projected import projected_grads
from .store import LogStore, StoreSchema, model_fingerprint

IdsFn = Callable[[Any, int], Tensor | list]


def position_ids(batch: Any, offset: int) -> Tensor:
    """Data ids = positions in the loader's order (needs a loader without shuffling)."""
    return torch.arange(offset, offset + ModelBatch.from_batch(batch).size)


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
    spec: Any,
    dtype: torch.dtype = torch.float32,
    *,
    captures: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> StoreSchema:
    """The schema of a store of ``spec``'s projected gradients of ``model``, and of the entries
    ``"name.kind"`` of ``captures`` (an example :func:`~logix_func.capturing.capture` result)."""
    layers = layer_dims(spec)
    if captures is not None:
        extra = capture_shapes(captures)
        clash = sorted(set(extra) & set(layers))
        if clash:
            raise ValueError(f"captured entries {clash} have the names of gradient layers")
        layers = {**layers, **extra}
    return StoreSchema(
        layers=layers, dtype=dtype, spec=spec.to_dict(), fingerprint=model_fingerprint(model)
    )


def log_dataset(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loader: Iterable[Any],
    spec: Any,
    store: LogStore | str,
    *,
    loss_fn: Any = None,
    ids: IdsFn = position_ids,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    group: Group = None,
) -> LogStore:
    """Append the projected gradient of every example of ``loader`` to ``store``.

    ``store`` is an open LogStore or a URL (created with :func:`store_schema` if absent).
    Examples whose data id is already committed are skipped, so a rerun after a crash resumes
    without duplicates or gaps. ``ids(batch, offset)`` names the examples of a batch
    (default: positions in the loader's order). Returns the store, flushed.

    With a process ``group`` every rank passes the same loader and logs its batches
    (``i % world == rank``) as writer ``rank`` of the store; the ranks then wait for each other,
    so the returned store shows every rank's rows. A DDP-wrapped model is unwrapped.
    """
    model = local_model(model)
    rank, world = rank_world(group)
    if isinstance(store, str):
        schema = store_schema(model, spec, dtype)
        store = LogStore.create(store, schema, writer=rank, exist_ok=True)
    expected = spec.to_dict()
    if store.schema.spec != expected:
        raise ValueError(
            f"the store at {store.url} was written with another projection spec; "
            "log to a new store or use the spec it records (ProjectionSpec.from_dict)"
        )
    done = store.committed_ids()
    total = -(-len(loader) // world) if hasattr(loader, "__len__") else None
    mine = rank_batches(loader, group)
    for _, offset, batch in tqdm(
        mine, total=total, desc="logging", unit="batch", disable=not progress
    ):
        batch_ids = ids(batch, offset)
        keys = batch_ids.tolist() if isinstance(batch_ids, Tensor) else list(batch_ids)
        todo = [i for i, key in enumerate(keys) if key not in done]
        if not todo:
            continue
        if len(todo) < len(keys):
            index = torch.tensor(todo)
            batch = take(batch, index)
            picked = [keys[i] for i in todo]
            batch_ids = batch_ids[index] if isinstance(batch_ids, Tensor) else picked
        rows = projected_grads(model, params, batch, spec, loss_fn=loss_fn)
        store.append(batch_ids, {k: v.to(dtype) for k, v in rows.items()})
    store.flush()
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)
        store.refresh()
    return store


def fit_curvature(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loader: Iterable[Any],
    spec: Any,
    *,
    method: Literal["kfac", "ekfac", "raw", "ggn"] = "ekfac",
    fisher: Fisher | None = None,
    seed: int = 0,
    loss_fn: Any = None,
    progress: bool = True,
    group: Group = None,
) -> dict[str, Any]:
    """Curvature factors of ``model`` over ``loader`` (one pass; two for EKFAC).

    ``method``: ``"kfac"``, ``"ekfac"``, ``"raw"`` (covariance of the gradients under
    ``fisher``) or ``"ggn"``: the exact per-layer Gauss-Newton matrix in the projected space,
    ``(1/N) Σ_n Σ_c p_nc g_nc g_ncᵀ`` — ``raw(eigh=False)`` over the exact-Fisher logs,
    factors ``{"C": [k, k]}`` per layer (``k = k_out·k_in``: for small models or LoGra ranks
    up to ≈ 64) that :func:`~logix_func.preconditioner` solves through a Cholesky factor.
    ``fisher`` defaults to ``"exact"`` for ``"ggn"`` (``"true"`` gives its one-draw
    Monte-Carlo estimate; the empirical Fisher is not a GGN and is refused) and to ``"true"``
    otherwise.

    Batch ``i`` draws its labels with seed ``seed + i`` (``fisher="true"``), the same in both
    EKFAC passes, so the eigenvalue correction sees the labels the factors were fitted on.

    With a process ``group`` every rank passes the same loader and accumulates its batches
    (``i % world == rank``, still seeded ``seed + i``); the states are summed over the ranks
    before finalizing, and the first rank's factors (KFAC's before the EKFAC pass too) are
    broadcast, so every rank returns those of a single process over the whole loader.
    """
    model = local_model(model)
    device = next(iter(params.values())).device
    if method == "ggn":
        if fisher == "empirical":
            raise ValueError(
                "method='ggn' needs the model's own label distribution: use fisher='exact' "
                "(default) or 'true'; for the empirical Fisher's covariance use method='raw'"
            )
        fisher = fisher or "exact"
    fisher = fisher or "true"

    def passes(desc: str):
        bar = tqdm(rank_batches(loader, group), desc=desc, unit="batch", disable=not progress)
        for i, _, batch in bar:
            yield fisher_logs(
                model, params, batch, spec, fisher=fisher, seed=seed + i, loss_fn=loss_fn
            )

    def finalize(transform: Any, state: dict[str, Any]) -> dict[str, Any]:
        factors = transform.finalize(all_reduce_state(state, group))
        return broadcast_state(factors, group)

    if method in ("raw", "ggn"):
        transform = raw(eigh=method == "raw")
        state = transform.init(spec, device)
        for grads, logs in passes(f"{method} covariance"):
            state = transform.update(state, grads, logs)
        return finalize(transform, state)
    if method not in ("kfac", "ekfac"):
        raise ValueError(f"method must be 'kfac', 'ekfac', 'raw' or 'ggn', got {method!r}")
    k = kfac(fisher)
    state = k.init(spec, device)
    for _, logs in passes("KFAC"):
        state = k.update(state, logs)
    factors = finalize(k, state)
    if method == "kfac":
        return factors
    e = ekfac(factors)
    state = e.init(device)
    for grads, logs in passes("EKFAC"):
        state = e.update(state, grads, logs)
    return finalize(e, state)
