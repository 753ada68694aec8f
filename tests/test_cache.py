"""Results found again by provenance: cached factors and self-influence, top-k of stored
scores, string ids in log_dataset, and what a store says about itself."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_provenance import one_at_a_time, small_problem
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf
from logix_func.store import StoreError


def leaves(tree, path=""):
    if isinstance(tree, dict):
        return {k: v for key in sorted(tree) for k, v in leaves(tree[key], f"{path}/{key}").items()}
    return {path: tree}


def assert_same_factors(a, b):
    a, b = leaves(a), leaves(b)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert a[k] == b[k], k


def test_fit_curvature_cache_hits_and_misses_on_any_change(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    calls = []

    def loss(out, t):  # counts the passes that compute anything
        calls.append(1)
        return F.cross_entropy(out, t, reduction="sum")

    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    cache = str(tmp_path / "cache")

    def fit(params=params, loader=loader, method="ekfac", cache=cache):
        calls.clear()
        options = dict(method=method, fisher="empirical", loss_fn=loss, progress=False)
        return lf.fit_curvature(model, params, loader, spec, cache=cache, **options)

    reference = fit(cache=None)
    assert calls
    assert_same_factors(fit(), reference)  # a miss: fitted and saved
    assert calls
    assert_same_factors(fit(), reference)  # a hit: nothing computed
    assert calls == []
    entries = sorted(os.listdir(cache))
    assert len(entries) == 1 and entries[0].startswith("curvature-ekfac-")

    trained = {k: v.detach() + 0.01 for k, v in params.items()}
    retrained = fit(trained)  # a weight change misses
    assert calls and retrained["weights"] == lf.weights_fingerprint(model, trained)
    assert_same_factors(retrained, fit(trained, cache=None))
    fewer = DataLoader(TensorDataset(x[:24], y[:24]), batch_size=8)
    for changed in (dict(loader=fewer), dict(method="kfac")):  # other data, another method
        fit(**changed)
        assert calls, changed
    assert len(os.listdir(cache)) == 4  # every entry kept beside the others
    fit(trained)
    assert calls == []
    with pytest.raises(TypeError, match="reads the data twice.*not a one-shot generator"):
        fit(loader=(batch for batch in loader))


def test_self_influence_cache_skips_the_store_and_tracks_the_damping(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    store = lf.log_dataset(model, params, loader, spec, str(tmp_path / "train"), progress=False)
    factors = lf.fit_curvature(model, params, loader, spec, progress=False)
    pre = lf.preconditioner(factors)
    cache = tmp_path / "cache"
    expected = lf.self_influence(store, preconditioner=pre)
    torch.testing.assert_close(lf.self_influence(store, preconditioner=pre, cache=cache), expected)
    for chunk in Path(store.url).glob("shards/0/layers/*/c.*"):  # damage every row chunk
        chunk.write_bytes(b"\0" * chunk.stat().st_size)
    with pytest.raises(StoreError, match="damaged|decompress"):
        lf.self_influence(store, preconditioner=pre)  # a scan reads the damaged chunks
    cached = lf.self_influence(store, preconditioner=pre, cache=cache)  # the cache does not
    torch.testing.assert_close(cached, expected)
    with pytest.raises(
        StoreError, match="damaged|decompress"
    ):  # another damping is another entry: a scan
        lf.self_influence(store, preconditioner=lf.preconditioner(factors, 0.5), cache=cache)
    with pytest.raises(TypeError, match="needs a preconditioner built by lf.preconditioner"):
        lf.self_influence(store, preconditioner=lambda g: g, cache=cache)


def test_string_ids_scores_carry_ids_and_top_k_of_stored_scores(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 30, 7)]
    names = [f"doc-{i:02d}" for i in range(30)]
    url = str(tmp_path / "train")
    store = lf.log_dataset(
        model, params, batches, spec, url, ids=lambda b, o: names[o : o + len(b[1])], progress=False
    )
    assert store.schema.ids == "str" and store.ids() == names
    rows = one_at_a_time(model, params, x, y, spec)
    for name, v in store.read(names).items():
        torch.testing.assert_close(v, rows[name], rtol=1e-5, atol=1e-6)
    assert store.spec.to_dict() == spec.to_dict()
    assert store.provenance == lf.provenance(model, params, spec)
    assert store.writers == {0: 30} and store.dtype == torch.float32
    assert store.nbytes == 30 * sum(v[0].numel() for v in rows.values()) * 4

    query = lf.projected_grads(model, params, (x[:3], y[:3]), spec)
    explicit = sum(query[k].flatten(1) @ rows[k].flatten(1).T for k in rows)
    order = explicit.topk(4).indices.tolist()
    scores = lf.influence(query, store)
    assert scores.ids == names
    assert lf.top_k(scores, 4).ids == [[names[j] for j in row] for row in order]
    assert lf.top_k(scores * 1, 4).ids.tolist() == order  # a derived tensor: positions

    out = str(tmp_path / "scores")
    lf.influence(query, store, out=out, chunk_rows=8)
    stored = lf.top_k(out, 4)  # read back chunk by chunk, never rescored
    assert stored.ids == [[names[j] for j in row] for row in order]
    torch.testing.assert_close(stored.values, explicit.topk(4).values, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k must be a positive int"):
        lf.top_k(scores, 0)
    more = [(x[:2], y[:2])]
    lf.log_dataset(
        model, params, more, spec, url, ids=lambda b, o: ["new-a", "new-b"], progress=False
    )
    with pytest.raises(ValueError, match="30 columns.*now has 32 rows.*Pass ids="):
        lf.top_k(out, 4)
    assert lf.top_k(out, 4, ids=names).ids == stored.ids
