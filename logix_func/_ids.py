"""Data ids: stable int64 ids for the rows of a batch, and a duplicate check.

A log keys each row by a data id (int64, or a string in a store with ``ids="str"``). Three ways
to get an int64 one:

- ``index_ids(start, n)`` / ``IndexedDataset``: the row's index in the dataset (best when the
  dataset is fixed; survives shuffling and distributed samplers through ``IndexedDataset``).
- ``content_ids(*tensors)``: a 63-bit blake2b hash of each row's bytes, dtype and shape —
  the same on every process, run, machine and device, and independent of the batch it is in.
- ``string_ids(strings)``: a 63-bit blake2b hash of string keys (a dataset's own ``"id"``).

Hash ids are non-negative int64 values; two different rows collide with probability 2⁻⁶³ per
pair, and ``check_unique`` turns a collision into an error instead of a silent overwrite.
"""

import hashlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Subset

_CONTENT_TAG = b"lf.content.v1"
_STRING_TAG = b"lf.string.v1"
_SHOWN = 10


def _hash63(tag: bytes, *parts: Any) -> int:
    h = hashlib.blake2b(digest_size=8, person=tag)
    for part in parts:
        h.update(part)
    return int.from_bytes(h.digest(), "little") >> 1


def _named_tensors(tree: Any, path: str) -> list[tuple[str, Tensor]]:
    if isinstance(tree, Tensor):
        return [(path, tree)]
    if isinstance(tree, Mapping):
        return [nt for k in sorted(tree) for nt in _named_tensors(tree[k], f"{path}.{k}")]
    if isinstance(tree, (tuple, list)):
        return [nt for i, t in enumerate(tree) for nt in _named_tensors(t, f"{path}.{i}")]
    raise TypeError(
        f"content_ids hashes tensors (or dicts/tuples of them), got {type(tree)} at {path!r}"
    )


def _row_bytes(t: Tensor) -> np.ndarray:
    """``t [N, *row]`` → ``uint8 [N, row bytes]`` (host memory, little-endian, contiguous)."""
    t = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    n = t.shape[0]
    return t.reshape(n, t[0].numel() if n else 0).view(torch.uint8).numpy()


def content_ids(*tensors: Tensor | Mapping | Sequence) -> Int[Tensor, " n"]:
    """A 63-bit content hash of each row: ``ids[i]`` depends only on row ``i`` of every tensor.

    Every tensor (or leaf of a dict/tuple, dict keys sorted) carries the rows on dimension 0.
    Row ``i`` hashes, for each leaf in order, its path (``".0"``, ``".0.input_ids"`` …), its
    dtype, its row shape and the row's raw bytes, with blake2b (8-byte digest read
    little-endian, shifted right by one bit). Bytes are hashed exactly: ``-0.0`` and ``0.0``
    differ, and so do float32 and float64 copies of the same values. Runs on the host (not
    inside ``torch.compile``).

    Returns:
        ``int64 [N]`` on CPU, non-negative.
    """
    leaves = [nt for i, t in enumerate(tensors) for nt in _named_tensors(t, f".{i}")]
    if not leaves:
        raise ValueError("content_ids needs at least one tensor")
    sizes = {path: t.shape[0] if t.ndim else None for path, t in leaves}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"every tensor needs the same leading (row) dimension, got {sizes}")
    headers = [f"{path}\0{t.dtype}\0{tuple(t.shape[1:])}\0".encode() for path, t in leaves]
    rows = [_row_bytes(t) for _, t in leaves]
    n = leaves[0][1].shape[0]
    ids = [
        _hash63(_CONTENT_TAG, *(p for h, r in zip(headers, rows, strict=True) for p in (h, r[i])))
        for i in range(n)
    ]
    return torch.tensor(ids, dtype=torch.int64).reshape(n)


def string_ids(strings: Sequence[str]) -> Int[Tensor, " n"]:
    """A 63-bit blake2b hash of each string's UTF-8 bytes: ``int64 [N]`` on CPU."""
    if isinstance(strings, str) or not all(isinstance(s, str) for s in strings):
        raise TypeError("string_ids takes a sequence of str")
    return torch.tensor(
        [_hash63(_STRING_TAG, s.encode()) for s in strings], dtype=torch.int64
    ).reshape(len(strings))


def index_ids(start: int, n: int, device: torch.device | str | None = None) -> Int[Tensor, " n"]:
    """Dataset indices ``start … start + n - 1`` as ``int64 [n]`` (an unshuffled loader's ids:
    ``index_ids(step * batch_size, len(batch))``)."""
    if start < 0 or n < 0:
        raise ValueError(f"index_ids needs start >= 0 and n >= 0, got start={start}, n={n}")
    return torch.arange(start, start + n, dtype=torch.int64, device=device)


class IndexedDataset(Dataset):
    """A map-style dataset whose items are ``(index, item)``: with the default collate a
    loader yields ``(ids int64 [B], batch)`` whatever its sampler (shuffled, distributed)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class _IndexCollate:
    """Collates ``(index, item)`` pairs into ``(ids int64 [B], collate(items))``; ``ids`` are
    ``table[index]`` when a table is given."""

    def __init__(self, collate: Any, table: Tensor | None):
        self.collate, self.table = collate, table

    def __call__(self, pairs: list[tuple[int, Any]]) -> tuple[Tensor, Any]:
        index = torch.tensor([i for i, _ in pairs], dtype=torch.int64)
        ids = index if self.table is None else self.table[index]
        return ids, self.collate([item for _, item in pairs])


def _root_table(dataset: Dataset) -> Tensor | None:
    """``table[i]``: index ``i`` of ``dataset`` as an index into the dataset under its
    ``Subset`` wrappers (so the splits of one dataset share one id space); None if unwrapped."""
    if not isinstance(dataset, Subset):
        return None
    table = torch.arange(len(dataset))
    while isinstance(dataset, Subset):
        table = torch.as_tensor(dataset.indices, dtype=torch.int64)[table]
        dataset = dataset.dataset
    return table


def indexed_loader(loader: Any) -> DataLoader | None:
    """A copy of ``loader`` that yields ``(ids int64 [B], batch)``: ``ids`` are the dataset
    indices its sampler picked (through ``Subset`` wrappers), right under any shuffling.

    The copy keeps the sampler, collate function and workers; a standard ``BatchSampler``
    loses ``drop_last`` so that every example comes out. ``None`` when ``loader`` is not a
    ``DataLoader`` over a map-style dataset with automatic batching (its ids are unknown).
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    batches = loader.batch_sampler
    if batches is None:
        return None
    if type(batches) is BatchSampler and batches.drop_last:
        batches = BatchSampler(batches.sampler, batches.batch_size, drop_last=False)
    workers = loader.num_workers
    return DataLoader(
        IndexedDataset(loader.dataset),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_IndexCollate(loader.collate_fn, _root_table(loader.dataset)),
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )


class DuplicateIdError(ValueError):
    """Data ids that repeat within a batch or were seen before; ``.ids`` lists them."""

    def __init__(self, message: str, ids: list):
        super().__init__(message)
        self.ids = ids


def _as_list(ids: Tensor | Sequence) -> list:
    if isinstance(ids, Tensor):
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.is_complex():
            raise TypeError(
                f"data ids are a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}"
            )
        return ids.tolist()
    if isinstance(ids, str):
        raise TypeError("data ids are a sequence of ints or strings, not one string")
    return list(ids)


def _shown(ids: list) -> str:
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return f"{ids[:_SHOWN]}{more}"


def _isin(ids: Tensor, seen: Tensor) -> Tensor:
    """``ids ∈ seen``; a sorted ``seen`` (a log's id index) takes a binary search."""
    if len(seen) == 0:
        return torch.zeros_like(ids, dtype=torch.bool)
    if bool((seen[1:] >= seen[:-1]).all()):
        at = torch.searchsorted(seen, ids).clamp_max(len(seen) - 1)
        return seen[at] == ids
    return torch.isin(ids, seen)


def check_unique(
    ids: Int[Tensor, " n"] | Sequence, seen: Collection | Tensor | None = None
) -> None:
    """Raise ``DuplicateIdError`` naming every id of ``ids`` that repeats within ``ids`` or is
    in ``seen``: a set, any collection, or an id tensor (a sorted one is searched fastest).

    Ids are ints or strings. Nothing is changed: keep ``seen`` yourself, e.g.
    ``seen.update(ids.tolist())``.
    """
    values = _as_list(ids)
    repeated = [v for v, c in Counter(values).items() if c > 1]
    if repeated:
        raise DuplicateIdError(
            f"{len(repeated)} data id(s) repeat within the batch: {_shown(repeated)}", repeated
        )
    if seen is None:
        return
    if isinstance(seen, Tensor) and isinstance(ids, Tensor):
        again = ids[_isin(ids, seen.reshape(-1).to(ids.device))].tolist()
    else:
        seen = set(_as_list(seen.reshape(-1))) if isinstance(seen, Tensor) else seen
        again = [v for v in values if v in seen]
    if again:
        raise DuplicateIdError(f"{len(again)} data id(s) were seen before: {_shown(again)}", again)
