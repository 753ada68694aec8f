"""Results saved under a location and found again by what produced them.

An entry is a file ``<name>-<key>.pt`` under a cache location (a folder, URL or kvstore spec,
see :mod:`logix_func.store.kvstore`): ``key`` hashes a *record*, the JSON dict of everything the
result depends on (weights fingerprint, spec tag, loss, method, a fingerprint of the data...),
and the file holds ``{"record": record, "value": value}``. A changed input changes the key,
so it is computed anew and saved beside the old entries; nothing is ever replaced or deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._origin import loss_name, spec_hex, weights_fingerprint
from ._version import __version__
from .curvature import load_state, save_state
from .store.kvstore import Location, describe, join
from .typing import Spec

Record = dict[str, Any]
_DATA_TAG = b"lf.data.v1"


def data_fingerprint(loader: Iterable[Any]) -> str:
    """16 hex digits hashing every tensor of every batch of ``loader``, in order (names,
    dtypes, shapes and bytes, blake2b): equal exactly when the batches are. One pass over the
    data, without the model."""
    h = hashlib.blake2b(digest_size=8, person=_DATA_TAG)
    for i, batch in enumerate(loader):
        h.update(f"batch {i}\0".encode())
        for name, leaf in _leaves(batch, ""):
            if isinstance(leaf, Tensor):
                t = leaf.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
                h.update(f"{name}\0{t.dtype}\0{tuple(leaf.shape)}\0".encode())
                h.update(memoryview(t.view(torch.uint8).numpy()))
            else:  # strings, numbers, None: their repr
                h.update(f"{name}\0{type(leaf).__name__}\0{leaf!r}\0".encode())
    return h.hexdigest()


def _leaves(tree: Any, path: str) -> Iterable[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for k in sorted(tree, key=str):
            yield from _leaves(tree[k], f"{path}.{k}")
    elif isinstance(tree, (tuple, list)):
        for i, t in enumerate(tree):
            yield from _leaves(t, f"{path}.{i}")
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            yield from _leaves(getattr(tree, f.name), f"{path}.{f.name}")
    else:
        yield path, tree


def entry(cache: Location, name: str, record: Record) -> Location:
    """Where the entry of ``record`` lives: ``cache/<name>-<16 hex digits>.pt``."""
    key = hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=8).hexdigest()
    return join(cache, f"{name}-{key}.pt")


def cached(cache: Location, name: str, record: Record, make: Callable[[], Any]) -> Any:
    """The value saved for ``record`` under ``cache``, or ``make()``, saved there first."""
    where = entry(cache, name, record)
    try:
        saved = load_state(where)
    except FileNotFoundError:
        value = make()
        save_state({"record": record, "value": value}, where)
        return value
    if not isinstance(saved, Mapping) or saved.get("record") != record:
        found = saved.get("record") if isinstance(saved, Mapping) else type(saved).__name__
        raise ValueError(
            f"the cache entry {describe(where)} was made for {found}, not for {record}: "
            "written by something else; move it away (it is not replaced) or use another cache"
        )
    return saved["value"]


def tensor_ids_hash(ids: Tensor | list) -> str:
    """16 hex digits of a store's ids (an int64 tensor or a list of str), in order."""
    h = hashlib.blake2b(digest_size=8, person=_DATA_TAG)
    if isinstance(ids, Tensor):
        h.update(memoryview(ids.contiguous().numpy()))
    else:
        h.update("\0".join(ids).encode())
    return h.hexdigest()


def curvature_record(
    model: Any, params: Any, loader: Iterable[Any], spec: Spec, **options: Any
) -> Record:
    """What factors of :func:`~logix_func.fit_curvature` depend on: the weights fingerprint,
    the spec tag, the loss name, the data's fingerprint and ``options`` (method, Fisher,
    seed, the label sampler's name), with the package version."""

    if iter(loader) is loader:
        raise TypeError(
            "fit_curvature(cache=...) reads the data twice (its hash, then the fit): pass a "
            f"DataLoader or a list of batches, not a one-shot {type(loader).__name__}"
        )
    sampler = options.pop("label_sampler", None)
    if sampler is not None:  # named like the loss; records without one keep their keys
        options["label_sampler"] = loss_name(sampler)
    return {
        "weights": weights_fingerprint(model, params),
        "spec": spec_hex(spec),
        "loss": loss_name(options.pop("loss_fn")),
        "data": data_fingerprint(loader),
        **options,
        "version": __version__,
    }


def self_influence_record(train: Any, preconditioner: Any) -> Record:
    """What :func:`~logix_func.self_influence` of a store depends on: the store (location,
    creation time, provenance, a hash of its ids) and the preconditioner (the provenance of
    its factors and its damping per layer)."""
    from .curvature import IdentityPreconditioner, Preconditioner

    if isinstance(train, Mapping) or not hasattr(train, "attrs"):
        raise TypeError(
            "self_influence(cache=...) caches the values of a LogStore: rows in memory "
            "have no provenance to key them by"
        )
    if preconditioner is None or isinstance(preconditioner, IdentityPreconditioner):
        pre = None
    elif type(preconditioner) is Preconditioner and preconditioner.provenance["weights"]:
        pre = {"factors": preconditioner.provenance, "damping": preconditioner.damping}
    else:
        raise TypeError(
            "self_influence(cache=...) needs a preconditioner built by lf.preconditioner("
            "factors of fit_curvature) (or none): another callable cannot be told apart from "
            f"a changed one, got {type(preconditioner).__name__}"
        )
    return {
        "store": describe(train.url),
        "created": train.attrs.get("created"),
        "provenance": train.provenance,
        "ids": tensor_ids_hash(train.ids()),
        "preconditioner": pre,
        "version": __version__,
    }
