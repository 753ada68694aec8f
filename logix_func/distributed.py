"""Data-parallel attribution under ``torch.distributed``: which share each rank computes, and how
the shares are combined.

* :func:`rank_batches`: batch ``i`` of a loader belongs to rank ``i % world`` (its batch index
  and sample offset are the single-process ones, so ids and label-draw seeds do not change).
* :func:`all_reduce_state`: curvature states are sums, so summing them over ranks gives the
  single-process state.
* :func:`store_part`, :func:`gather_top_k`, :func:`gather_scores`: each rank scores a contiguous
  block of a store's rows; top-k and score columns are gathered in the store's read order.
* :func:`local_model`, :func:`full_params`: the plain module inside a DDP wrapper, and the
  unsharded parameters of an FSDP2 (``fully_shard``) model.

Every function takes a process group (``torch.distributed.group.WORLD`` for all ranks);
``group=None`` means this process alone and runs no collective. Collectives run on CUDA under
NCCL and on the tensors' own device otherwise (gloo: CPU).
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ._batch import ModelBatch
from ._influence import TopK
from ._stats import all_reduce_stat, is_stat_state
from .curvature._dual import is_rows
from .store import LogStore

Group = Any  # a torch.distributed ProcessGroup, or None for this process alone


def rank_world(group: Group) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` for ``group=None``."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _device(group: Group, like: Tensor) -> torch.device:
    """Where a collective on ``group`` needs its tensors: CUDA for NCCL, else ``like``'s device."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device


# ------------------------------------------------------------------ models


def local_model(model: nn.Module) -> nn.Module:
    """The module to call functionally: ``model.module`` for ``DistributedDataParallel``.

    A DDP wrapper's own ``forward`` arms its gradient-synchronisation hooks, so per-sample
    gradients go through the wrapped module instead (same parameters, no collectives).
    FSDP2 modules (``fully_shard``) hold sharded ``DTensor`` parameters and all-gather them in
    forward hooks, which cannot run under ``functional_call``/``vmap``: they raise a
    ``TypeError``; pass an unsharded instance of the architecture with :func:`full_params`.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module
    # a sharded model means FSDP is imported already; importing it here would cost ~1 s
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules()):
        raise TypeError(
            f"{type(model).__name__} is sharded with fully_shard: its forward hooks all-gather "
            "DTensor parameters, which functional_call and vmap cannot run; pass an unsharded "
            "instance of the same architecture and params=full_params(model)"
        )
    return model


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """``{name: Tensor}`` of ``model``'s parameters, unsharded and detached.

    ``DTensor`` parameters (FSDP2, tensor parallel) are all-gathered with ``full_tensor()``:
    a collective, so every rank must call it. Names are those of the unwrapped module (a DDP
    wrapper's ``module.`` prefix is dropped).
    """
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for name, p in model.named_parameters()
    }


# ------------------------------------------------------------------ data


def rank_batches(loader: Iterable[Any], group: Group) -> Iterator[tuple[int, int, Any]]:
    """``(batch index, offset, batch)`` of this rank's batches: index ``i`` with
    ``i % world == rank``; ``offset`` = samples in the batches before it (the loader's order).

    A ``DataLoader`` over a map-style dataset loads only this rank's batches (its batch sampler
    is split; the ranks check that their samplers agree). Any other iterable is read whole on
    every rank and the other ranks' batches are skipped. Every rank must see the same batches
    in the same order: no unseeded shuffling.
    """
    rank, world = rank_world(group)
    split = (
        isinstance(loader, DataLoader)
        and loader.batch_sampler is not None
        and not isinstance(loader.dataset, IterableDataset)
    )
    if world > 1 and split:
        batches = [list(b) for b in loader.batch_sampler]
        _check_same_batches(batches, group)
        offsets = list(itertools.accumulate((len(b) for b in batches), initial=0))
        mine = _reload(loader, batches[rank::world])
        for j, batch in enumerate(mine):
            i = rank + j * world
            yield i, offsets[i], batch
        return
    offset = 0
    for i, batch in enumerate(loader):
        if i % world == rank:
            yield i, offset, batch
        offset += ModelBatch.from_batch(batch).size


def _check_same_batches(batches: list[list[int]], group: Group) -> None:
    import torch.distributed as dist

    digest = hashlib.blake2b(repr(batches).encode(), digest_size=8).hexdigest()
    seen: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, digest, group=group)
    if len(set(seen)) > 1:
        raise ValueError(
            "the ranks' DataLoaders yield different batches (unseeded shuffling?): every rank "
            "must see the same batches in the same order to split them without overlap or gaps"
        )


def _reload(loader: DataLoader, batches: list[list[int]]) -> DataLoader:
    """``loader`` restricted to ``batches`` (lists of dataset indices), other settings kept."""
    return DataLoader(
        loader.dataset,
        batch_sampler=batches,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=loader.in_order,
    )


# ------------------------------------------------------------------ curvature states


def _tensors(tree: Any, skip: str = "spec") -> list[Tensor]:
    """Tensor leaves of a nested dict in sorted-key order, without the top-level ``skip``."""
    if isinstance(tree, Tensor):
        return [tree]
    return [t for k in sorted(tree) if k != skip for t in _tensors(tree[k], "")]


def _rebuild(tree: Any, leaves: Iterator[Tensor], skip: str = "spec") -> Any:
    if isinstance(tree, Tensor):
        return next(leaves)
    return {k: tree[k] if k == skip else _rebuild(tree[k], leaves, "") for k in sorted(tree)}


def _collective(tensors: list[Tensor], group: Group, op: Any) -> list[Tensor]:
    """``op(flat, group)`` on one flat buffer per dtype; the results in the input's order."""
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype in sorted(by_dtype, key=str):
        index = by_dtype[dtype]
        parts = [tensors[i] for i in index]
        flat = torch.cat([p.reshape(-1) for p in parts]).to(_device(group, parts[0]))
        op(flat, group)
        for i, piece in zip(index, flat.split([p.numel() for p in parts]), strict=True):
            out[i] = piece.reshape(tensors[i].shape).to(tensors[i].device)
    return out  # type: ignore[return-value]


def all_reduce_state(state: Mapping[str, Any], group: Group) -> dict[str, Any]:
    """Sum of a curvature state (``kfac``/``ekfac``/``raw``) over the ranks of ``group``.

    Every tensor except the ``spec`` tag is summed (one all-reduce per dtype), so finalizing
    the result gives the factors of a single process that saw every rank's data; a dual GGN's
    rows are gathered instead (concatenated in rank order). The ranks
    must hold states of the same spec and layers (else ``ValueError`` on every rank).
    A running statistic's state (moments about its mean) is merged by
    :func:`~logix_func._stats.all_reduce_stat`: sums about the common mean.
    """
    if group is None:
        return dict(state)
    if "spec" not in state and is_stat_state(state):
        return all_reduce_stat(state, group)
    if any(is_rows(k) for layer in state["layers"].values() for k in layer):
        return _gather_rows(state, group)
    import torch.distributed as dist

    leaves = _tensors(state)
    layout = [int(state["spec"]), len(leaves), sum(t.numel() for t in leaves)]
    check = torch.tensor(layout, device=_device(group, state["spec"]))
    seen = [torch.empty_like(check) for _ in range(dist.get_world_size(group))]
    dist.all_gather(seen, check, group=group)
    if any(not torch.equal(s, check) for s in seen):
        raise ValueError(
            "cannot all-reduce curvature states: the ranks built them for different projection "
            "specs or layers"
        )
    summed = _collective(leaves, group, lambda t, g: dist.all_reduce(t, group=g))
    return _rebuild(state, iter(summed))


def _gather_rows(state: Mapping[str, Any], group: Group) -> dict[str, Any]:
    """A dual GGN's state (:func:`~logix_func.curvature.dual_ggn`) over the ranks: each
    layer's rows (``row_*``) concatenated in rank order, its sample count summed. The rows'
    order does not change ``ΦᵀΦ``, so the factors are those of one process."""
    import torch.distributed as dist

    layers = state["layers"]
    # per layer and row key: (count, shape of one row); checked alike before any tensor moves
    layout = {
        (name, key): (t.shape[0], tuple(t.shape[1:]))
        for name in sorted(layers)
        for key, t in sorted(layers[name].items())
        if is_rows(key)
    }
    seen: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, (int(state["spec"]), sorted(layout), layout), group=group)
    if any((s[0], s[1]) != (int(state["spec"]), sorted(layout)) for s in seen):
        raise ValueError(
            "cannot gather dual GGN states: the ranks built them for different projection specs "
            "or layers, or kept their rows in different forms (gradients on one rank, "
            "activations and backprops on another)"
        )
    out = {name: dict(layer) for name, layer in layers.items()}
    for (name, key), (count, _) in layout.items():
        counts = [s[2][(name, key)][0] for s in seen]
        row = max((s[2][(name, key)] for s in seen), key=lambda c: c[0])[1]  # a filled rank's
        t = out[name][key]
        padded = t.new_zeros(max(counts), *row)
        padded[:count] = t.reshape(count, *row)
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.to(_device(group, t)), group=group)
        out[name][key] = torch.cat([p[:c].to(t.device) for p, c in zip(parts, counts, strict=True)])
    samples = [out[n]["samples"] for n in sorted(out)]
    summed = _collective(samples, group, lambda t, g: dist.all_reduce(t, group=g))
    for name, total in zip(sorted(out), summed, strict=True):
        out[name]["samples"] = total
    return {**state, "layers": out}


def broadcast_state(state: Mapping[str, Any], group: Group) -> dict[str, Any]:
    """``state`` (finalized factors, parameters: any nested dict of tensors) of the group's
    first rank, on every rank."""
    if group is None:
        return dict(state)
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0)
    tensors = _tensors(state, skip="")
    sent = _collective(tensors, group, lambda t, g: dist.broadcast(t, src=src, group=g))
    return _rebuild(state, iter(sent), skip="")


# ------------------------------------------------------------------ scoring


class StorePart:
    """Rows ``[start, stop)`` of a store in its read order; scores like a store.

    ``len``, ``schema``, ``ids()`` and ``iter_chunks`` are those of the store restricted to the
    block, so :func:`logix_func._influence` and :func:`logix_func.self_influence` accept it.
    """

    def __init__(self, store: LogStore, start: int, stop: int):
        self.store, self.start, self.stop = store, start, stop
        self.schema, self.url = store.schema, store.url

    def __len__(self) -> int:
        return self.stop - self.start

    def ids(self) -> Tensor | list[str]:
        """Data ids of the block's rows, in read order."""
        return self.store.ids()[self.start : self.stop]

    def check_unique(self) -> None:
        """:meth:`LogStore.check_unique` of the whole store."""
        self.store.check_unique()

    def iter_chunks(
        self, layers: Sequence[str] | None = None, chunk_rows: int | None = None, prefetch: int = 1
    ) -> Iterator[tuple[Any, dict[str, Tensor]]]:
        """:meth:`LogStore.iter_chunks` over the block."""
        return self.store.iter_chunks(
            layers, chunk_rows, prefetch, start=self.start, stop=self.stop
        )

    def __repr__(self) -> str:
        return f"StorePart({self.url!r}, rows {self.start}:{self.stop})"


def store_part(store: LogStore, group: Group) -> StorePart:
    """This rank's contiguous block of ``store``'s committed rows (blocks differ by ≤ 1 row).

    Rank ``r`` of ``w`` gets rows ``[r·N // w, (r+1)·N // w)`` of the read order, so the blocks
    concatenated in rank order are ``store.ids()``. Every rank must see the same rows (open or
    refresh the store after the writers have flushed).
    """
    rank, world = rank_world(group)
    n = len(store)
    if n < world:
        raise ValueError(
            f"{store.url} has {n} committed rows, fewer than the {world} ranks: some ranks "
            "would have no rows to score"
        )
    return StorePart(store, rank * n // world, (rank + 1) * n // world)


def gather_top_k(
    scores: Float[Tensor, "queries n"],
    k: int,
    *,
    group: Group,
    ids: Tensor | list | None = None,
    largest: bool = True,
) -> TopK:
    """The ``k`` best scores per query over every rank's columns, on every rank.

    ``scores`` holds this rank's columns (e.g. ``influence(query, store_part(store, group))``)
    and ``ids`` their data ids (default ``0..n-1``). Equals :func:`logix_func.top_k` of the
    full matrix (up to the order of tied scores).
    """
    ids = torch.arange(scores.shape[1]) if ids is None else ids
    if len(ids) != scores.shape[1]:
        raise ValueError(f"{len(ids)} ids for {scores.shape[1]} score columns")
    local = scores.topk(min(k, scores.shape[1]), dim=1, largest=largest)
    where = local.indices.cpu()
    picked = (
        ids[where] if isinstance(ids, Tensor) else [[ids[j] for j in row] for row in where.tolist()]
    )
    parts = [(picked, local.values.cpu())]
    if group is not None:
        import torch.distributed as dist

        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (picked, local.values.cpu()), group=group)
    values = torch.cat([v for _, v in parts], 1)
    if values.shape[1] < k:
        raise ValueError(f"k={k} is larger than the number of training rows ({values.shape[1]})")
    best, where = values.topk(k, dim=1, largest=largest)
    if all(isinstance(p, Tensor) for p, _ in parts):
        return TopK(torch.cat([p for p, _ in parts], 1).gather(1, where), best.to(scores.device))
    rows = [[x for p, _ in parts for x in p[q]] for q in range(values.shape[0])]
    chosen = [[row[j] for j in w] for row, w in zip(rows, where.tolist(), strict=True)]
    return TopK(chosen, best.to(scores.device))


def gather_scores(
    scores: Float[Tensor, "queries n"], *, group: Group
) -> Float[Tensor, "queries N"]:
    """Every rank's score columns side by side in rank order, on every rank: ``[Q, N]``.

    With :func:`store_part` the columns are in ``store.ids()`` order, as
    :func:`logix_func._influence` on the whole store returns them. Memory: the full matrix on
    each rank.
    """
    if group is None:
        return scores
    import torch.distributed as dist

    world = dist.get_world_size(group)
    device = _device(group, scores)
    size = torch.tensor([scores.shape[1]], device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    width = max(int(s) for s in sizes)
    padded = torch.zeros(scores.shape[0], width, dtype=scores.dtype, device=device)
    padded[:, : scores.shape[1]] = scores
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    full = torch.cat([g[:, : int(s)] for g, s in zip(gathered, sizes, strict=True)], 1)
    return full.to(scores.device)
