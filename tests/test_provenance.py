"""Provenance, safe ids, safe ``out=``, non-finite values and random forwards, on real stores."""

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import logix_func as lf
from logix_func.pipeline import fit_curvature, log_dataset


def small_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    x, y = torch.randn(30, 6), torch.randint(0, 4, (30,))
    return model, dict(model.named_parameters()), x, y


def one_at_a_time(model, params, x, y, spec) -> dict[str, torch.Tensor]:
    """The reference: each example's projected gradient computed on its own."""
    rows = [
        lf.projected_grads(model, params, (x[i : i + 1], y[i : i + 1]), spec) for i in range(len(x))
    ]
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def assert_rows(store, want: dict, ids: list[int]) -> None:
    got = store.read(ids)
    for name, v in want.items():
        torch.testing.assert_close(got[name], v[ids], rtol=1e-5, atol=1e-6)


# 1. out= never deletes data it did not create


def test_influence_out_refuses_a_non_empty_target_and_never_the_store(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    run = tmp_path / "run"
    store = log_dataset(
        model,
        params,
        DataLoader(TensorDataset(x, y), batch_size=8),
        spec,
        str(run / "train"),
        progress=False,
    )
    (run / "model.pt").write_bytes(b"weights")
    query = lf.projected_grads(model, params, (x[:2], y[:2]), spec)
    for target in (run, run / "train", run / "model.pt", run / "train" / "scores"):
        with pytest.raises(FileExistsError, match="never deletes data|existing file|inside"):
            lf.influence(query, store, out=str(target))
    assert (run / "model.pt").read_bytes() == b"weights"
    reopened = lf.LogStore.open(str(run / "train"))
    assert len(reopened) == 30
    assert_rows(reopened, one_at_a_time(model, params, x, y, spec), list(range(30)))
    # a new URL gets the scores, equal to the in-memory ones
    written = lf.influence(query, store, out=str(tmp_path / "scores"), chunk_rows=7)
    torch.testing.assert_close(
        torch.from_numpy(written.read().result()), lf.influence(query, store)
    )
    recorded = written.spec().to_json()["metadata"]["attributes"]["logix_func"]["scores"]
    assert recorded["train"]["weights"] == store.schema.weights
    assert recorded["train_url"] == store.url and recorded["mode"] == "dot"


# 2. provenance


def test_weights_fingerprint_hashes_the_values_of_every_parameter_and_buffer():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    fp = lf.weights_fingerprint(model)
    assert fp == lf.weights_fingerprint(copy.deepcopy(model))
    # an independent reference of the documented hash
    h = hashlib.blake2b(digest_size=8, person=b"lf.weights.v1")
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in sorted(named):
        t = named[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode() + t.numpy().tobytes())
    assert fp == h.hexdigest()
    for name in named:  # any single changed value changes it
        other = copy.deepcopy(model)
        changed = dict(other.named_parameters()) | dict(other.named_buffers())
        with torch.no_grad():
            changed[name].view(-1)[-1] += 1
        assert lf.weights_fingerprint(other) != fp, name
    params = {"0.weight": model[0].weight.detach() * 2}
    assert lf.weights_fingerprint(model, params) != fp
    assert lf.weights_fingerprint(model, dict(model.named_parameters())) == fp


def test_a_store_refuses_rows_of_other_weights_and_keeps_its_own(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    url = str(tmp_path / "train")
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    store = log_dataset(
        model, params, DataLoader(TensorDataset(x[:10], y[:10])), spec, url, progress=False
    )
    assert store.schema.weights == lf.weights_fingerprint(model, params)
    assert store.schema.loss == "default" and store.attrs["version"] == lf.__version__
    trained = {k: v.detach() + 0.01 for k, v in params.items()}
    new_fp = lf.weights_fingerprint(model, trained)
    with pytest.raises(ValueError, match=f"{store.schema.weights}.*{new_fp}.*new store"):
        log_dataset(model, trained, loader, spec, url, progress=False)
    with pytest.raises(ValueError, match="loss"):
        log_dataset(
            model,
            params,
            loader,
            spec,
            url,
            progress=False,
            loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="sum"),
        )
    # a hand-written loop opening the store with a schema of other weights is refused too
    with pytest.raises(lf.store.SchemaError, match=f"weights: store has '{store.schema.weights}'"):
        lf.LogStore.create(url, lf.store_schema(model, spec, params=trained), exist_ok=True)
    # the same weights grow the store; its rows are those of the original weights
    grown = log_dataset(model, params, loader, spec, url, progress=False)
    assert len(lf.LogStore.open(url)) == 30
    assert_rows(grown, one_at_a_time(model, params, x, y, spec), list(range(30)))


def test_scoring_refuses_query_store_and_factors_of_different_origins(tmp_path):
    model, params, x, y = small_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    spec, other_seed = lf.logra(model, rank=3, seed=0), lf.logra(model, rank=3, seed=1)
    store = log_dataset(model, params, loader, spec, str(tmp_path / "s"), progress=False)
    factors = fit_curvature(model, params, loader, spec, method="kfac", progress=False)
    assert factors["weights"] == store.schema.weights and factors["loss"] == "default"
    pre = lf.preconditioner(factors, damping=1e-3)
    query = lf.projected_grads(model, params, (x[:3], y[:3]), spec)
    origin = lf.provenance(model, params, spec)
    want = lf.influence(query, store, preconditioner=pre, query_provenance=origin)
    torch.testing.assert_close(
        want, lf.influence(query, one_at_a_time(model, params, x, y, spec), preconditioner=pre)
    )

    # another projection seed, same shapes: query and factors refused against the store
    q_other = lf.projected_grads(model, params, (x[:3], y[:3]), other_seed)
    with pytest.raises(ValueError, match="query rows.*store.*projection specs"):
        lf.influence(q_other, store, query_provenance=lf.provenance(model, params, other_seed))
    pre_other = lf.preconditioner(
        fit_curvature(model, params, loader, other_seed, method="kfac", progress=False), 1e-3
    )
    for call in (
        lambda: lf.influence(query, store, preconditioner=pre_other),
        lambda: lf.self_influence(store, preconditioner=pre_other),
        lambda: lf.top_k(lf.influence_chunks(query, store, preconditioner=pre_other), 3),
    ):
        with pytest.raises(ValueError, match="store.*preconditioner.*projection specs"):
            call()
    # other weights: query rows and factors refused, naming both fingerprints
    moved = {k: v.detach() * 1.1 for k, v in params.items()}
    moved_fp, store_fp = lf.weights_fingerprint(model, moved), store.schema.weights
    with pytest.raises(ValueError, match=f"weights.*{moved_fp} vs {store_fp}"):
        lf.influence(query, store, query_provenance=lf.provenance(model, moved, spec))
    pre_moved = lf.preconditioner(
        fit_curvature(model, moved, loader, spec, method="kfac", progress=False), 1e-3
    )
    with pytest.raises(ValueError, match=f"weights.*{store_fp} vs {moved_fp}"):
        lf.influence(query, store, preconditioner=pre_moved)
    # token influence: query, training logs and factors checked the same way
    rows, logs = lf.projected_grads(model, params, (x[:4], y[:4]), spec, return_activations=True)
    with pytest.raises(ValueError, match="query rows.*training logs.*projection specs"):
        lf.token_influence(
            query,
            logs,
            query_provenance=lf.provenance(model, params, other_seed),
            train_provenance=origin,
        )
    torch.testing.assert_close(
        lf.token_influence(
            query, logs, preconditioner=pre, query_provenance=origin, train_provenance=origin
        ).sum(-1),
        lf.influence(query, rows, preconditioner=pre),
        rtol=1e-4,
        atol=1e-5,
    )


def test_a_store_without_provenance_still_opens_and_scores(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    rows = one_at_a_time(model, params, x, y, spec)
    old = lf.StoreSchema(
        layers={k: tuple(v.shape[1:]) for k, v in rows.items()}, spec=spec.to_dict()
    )  # as written before stores recorded weights
    url = str(tmp_path / "old")
    with lf.LogStore.create(url, old) as store:
        store.append(torch.arange(30), rows)
    store = lf.LogStore.open(url)
    query = lf.projected_grads(model, params, (x[:2], y[:2]), spec)
    got = lf.influence(query, store, query_provenance=lf.provenance(model, params, spec))
    torch.testing.assert_close(got, lf.influence(query, rows))
    with pytest.raises(ValueError, match="projection specs"):  # the spec is still checked
        lf.influence(
            query,
            store,
            query_provenance=lf.provenance(model, params, lf.logra(model, rank=3, seed=9)),
        )
    with pytest.raises(ValueError, match="no weights fingerprint.*new store"):
        log_dataset(model, params, DataLoader(TensorDataset(x, y)), spec, url, progress=False)


# 3. ids that cannot lie


def test_default_ids_are_dataset_indices_under_shuffling_drop_last_and_splits(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    want = one_at_a_time(model, params, x, y, spec)
    data = TensorDataset(x, y)
    url = str(tmp_path / "train")
    shuffled = DataLoader(data, batch_size=7, shuffle=True, drop_last=True)
    store = log_dataset(model, params, shuffled, spec, url, progress=False)
    assert sorted(store.ids().tolist()) == list(range(30))  # drop_last lost nothing
    assert_rows(store, want, list(range(30)))

    # two loaders of two splits into one store: ids are indices of the dataset beneath
    url = str(tmp_path / "splits")
    first, second = random_split(data, [18, 12], generator=torch.Generator().manual_seed(0))
    log_dataset(
        model, params, DataLoader(first, batch_size=5, shuffle=True), spec, url, progress=False
    )
    store = log_dataset(model, params, DataLoader(second, batch_size=4), spec, url, progress=False)
    assert sorted(store.ids().tolist()) == list(range(30))
    assert_rows(store, want, list(range(30)))


def test_a_store_grows_with_new_examples_and_other_iterables_need_ids(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    url = str(tmp_path / "train")
    log_dataset(
        model,
        params,
        DataLoader(TensorDataset(x[:12], y[:12]), batch_size=5),
        spec,
        url,
        progress=False,
    )
    store = log_dataset(
        model, params, DataLoader(TensorDataset(x, y), batch_size=5), spec, url, progress=False
    )
    assert len(store) == 30
    assert_rows(store, one_at_a_time(model, params, x, y, spec), list(range(30)))
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    with pytest.raises(ValueError, match="Pass ids="):
        log_dataset(model, params, batches, spec, str(tmp_path / "list"), progress=False)
    store = log_dataset(
        model,
        params,
        batches,
        spec,
        str(tmp_path / "list"),
        progress=False,
        ids=lambda batch, offset: lf.content_ids(batch[0]),
    )
    assert sorted(store.ids().tolist()) == sorted(lf.content_ids(x).tolist())


# 4. non-finite values


def test_non_finite_rows_are_refused_where_they_enter(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    schema = lf.store_schema(model, spec)
    with lf.LogStore.create(str(tmp_path / "s"), schema) as store:
        rows = one_at_a_time(model, params, x[:4], y[:4], spec)
        bad = {k: v.clone() for k, v in rows.items()}
        bad["2"][2, 0, 0] = float("nan")
        bad["0"][3, 1, 1] = float("inf")
        with pytest.raises(ValueError, match=r"non-finite.*data ids 12, 13 "):
            store.append([10, 11, 12, 13], bad)
    assert len(lf.LogStore.open(str(tmp_path / "s"))) == 0  # nothing of the batch stored
    x_nan = x.clone()
    x_nan[17, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*data ids 17\b"):
        log_dataset(
            model,
            params,
            DataLoader(TensorDataset(x_nan, y), batch_size=10),
            spec,
            str(tmp_path / "t"),
            progress=False,
        )
    assert sorted(lf.LogStore.open(str(tmp_path / "t")).ids().tolist()) == list(range(10))


def test_damping_must_be_finite_and_top_k_refuses_nan():
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3)
    factors = fit_curvature(model, params, [(x, y)], spec, method="kfac", progress=False)
    for damping in (float("inf"), float("nan"), -1.0, {"0": 1.0, "2": float("inf")}):
        with pytest.raises(ValueError, match="finite and ≥ 0"):
            lf.preconditioner(factors, damping)
    scores = torch.tensor([[1.0, float("nan"), 3.0, 0.5]])
    with pytest.raises(ValueError, match="NaN.*training row 1"):
        lf.top_k(scores, 2)
    assert lf.top_k(torch.tensor([[1.0, 4.0, 3.0]]), 2).ids.tolist() == [[1, 2]]


# 5. random forwards


class RandomForward(nn.Module):
    def __init__(self, draw: str):
        super().__init__()
        self.a, self.b, self.draw = nn.Linear(6, 8), nn.Linear(8, 4), draw

    def forward(self, x):
        h = self.a(x)
        if self.draw == "dropout":
            h = F.dropout(h, 0.2, training=True)
        elif self.draw == "bernoulli":
            h = h * torch.bernoulli(torch.full_like(h, 0.9))
        elif self.draw == "rand":
            h = h + 1e-3 * torch.rand(h.shape)
        elif self.draw == "eval_dropout":
            h = F.dropout(h, 0.2, training=self.training)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("draw", ["dropout", "bernoulli", "rand"])
def test_random_ops_in_the_forward_are_refused_with_advice_that_works(tmp_path, draw):
    model = RandomForward(draw).eval()
    params, spec = dict(model.named_parameters()), lf.logra(RandomForward(draw), rank=3)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    calls = {
        "projected_grads": lambda: lf.projected_grads(model, params, (x, y), spec),
        "capture": lambda: lf.capture(model, params, (x, y)),
        "fit_curvature": lambda: fit_curvature(model, params, loader, spec, progress=False),
        "exact_curvature": lambda: lf.exact_curvature(model, params, (x, y), spec),
        "log_dataset": lambda: log_dataset(
            model, params, loader, spec, str(tmp_path / "s"), progress=False
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="draws random numbers.*model.eval") as err:
            call()
        assert "randomness=" not in str(err.value) and "test_provenance.py" in str(err.value), name


def test_a_deterministic_forward_passes_and_compiled_or_vmapped_calls_refuse_draws():
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    model = RandomForward("eval_dropout").eval()
    params, spec = dict(model.named_parameters()), lf.logra(model, rank=3)
    want = lf.projected_grads(model, params, (x, y), spec)
    one = lf.projected_grads(model, params, (x[:1], y[:1]), spec)
    torch.testing.assert_close(want["a"][:1], one["a"])
    drawing = RandomForward("dropout").eval()
    compiled = torch.compile(
        lambda b: lf.projected_grads(drawing, dict(drawing.named_parameters()), b, spec),
        fullgraph=True,
    )
    with pytest.raises(Exception, match="draws random numbers"):
        compiled((x, y))
    drawing_params = dict(drawing.named_parameters())
    batched = torch.func.vmap(
        lambda xb, yb: lf.projected_grads(drawing, drawing_params, (xb, yb), spec)
    )
    with pytest.raises(ValueError, match="draws random numbers"):  # inside a torch.func transform
        batched(x.reshape(2, 4, 6), y.reshape(2, 4))
