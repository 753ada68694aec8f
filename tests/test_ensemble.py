"""Ensembles against explicit weighted sums of single-model ``influence`` calls."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf
from logix_func.pipeline import fit_curvature

N, Q = 24, 5


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=gen), torch.randint(0, 3, (N,), generator=gen)
    qx, qy = torch.randn(Q, 4, generator=gen), torch.randint(0, 3, (Q,), generator=gen)
    return (x, y), (qx, qy)


def member_parts(seed, rank, method, data):
    """``(model, params, spec, train rows, query rows, factors)`` of one member."""
    (x, y), query = data
    model = mlp(seed)
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = lf.logra(model, rank=rank, seed=seed)
    loader = list(zip(x.split(8), y.split(8), strict=True))
    factors = fit_curvature(model, params, loader, spec, method=method, progress=False)
    train = lf.projected_grads(model, params, (x, y), spec)
    return model, params, spec, train, lf.projected_grads(model, params, query, spec), factors


@pytest.fixture(scope="module")
def parts(data):
    """Three members: different models, specs (full, LoGra 2, LoGra 3) and curvatures."""
    return [
        member_parts(0, None, "ekfac", data),
        member_parts(1, 2, "ggn", data),
        member_parts(2, 3, "kfac", data),
    ]


@pytest.fixture()
def members(parts, tmp_path):
    """Member 1 reads a store whose rows were logged in reverse order with ids 0..N-1."""
    out = []
    for k, (model, _, spec, train, _, factors) in enumerate(parts):
        pre = lf.preconditioner(factors)
        if k == 1:
            store = lf.LogStore.create(str(tmp_path / "m1"), lf.store_schema(model, spec))
            order = torch.arange(N).flip(0)
            store.append(order, {n: v[order] for n, v in train.items()})
            store.flush()
            out.append(lf.Member(store, pre))
        else:
            out.append(lf.Member(train, pre))
    return out


def reference(parts, weights):
    """``Σ_k w_k influence_k`` with every member's columns in data-id order."""
    total = 0
    for w, (_, _, _, train, query, factors) in zip(weights, parts, strict=True):
        pre = lf.preconditioner(factors)
        total = total + w * lf.influence(query, train, preconditioner=pre).double()
    return total


@pytest.mark.parametrize("weights", [None, [0.5, 0.0, 2.0]], ids=["mean", "tracin-cp"])
def test_scores_top_k_and_self_influence_are_the_weighted_sums(parts, members, weights):
    queries = [p[4] for p in parts]
    w = [1 / 3] * 3 if weights is None else weights
    want = reference(parts, w)
    got = lf.ensemble_influence(queries, members, weights=weights, chunk_rows=7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

    best = lf.ensemble_top_k(queries, members, 4, weights=weights, chunk_rows=5)
    values, where = want.topk(4, dim=1)
    torch.testing.assert_close(best.values.double(), values, rtol=1e-5, atol=1e-6)
    assert torch.equal(best.ids, where)
    worst = lf.ensemble_top_k(queries, members, 2, weights=weights, largest=False)
    torch.testing.assert_close(worst.values.double(), want.topk(2, 1, largest=False).values)

    self_want = sum(
        wk * lf.self_influence(p[3], preconditioner=lf.preconditioner(p[5])).double()
        for wk, p in zip(w, parts, strict=True)
    )
    self_got = lf.ensemble_self_influence(members, weights=weights, chunk_rows=10)
    torch.testing.assert_close(self_got.double(), self_want, rtol=1e-5, atol=1e-6)


def test_a_store_first_gives_columns_in_its_own_order(parts, members):
    queries = [p[4] for p in parts]
    order = [1, 0, 2]
    got = lf.ensemble_influence([queries[i] for i in order], [members[i] for i in order])
    want = reference(parts, [1 / 3] * 3)[:, members[1].train.ids()]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_fit_members_logs_and_fits_each_member_and_resumes(data, tmp_path):
    (x, y), query = data
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # ids: dataset indices
    models = [mlp(0), mlp(1)]
    pairs = [(m, {k: v.detach() for k, v in m.named_parameters()}) for m in models]
    specs = [lf.logra(models[0], rank=None), lf.logra(models[1], rank=2, seed=1)]
    root = str(tmp_path / "ensemble")
    members = lf.fit_members(pairs, loader, specs, root, method="ggn", progress=False)
    queries = [lf.projected_grads(m, p, query, s) for (m, p), s in zip(pairs, specs, strict=True)]
    got = lf.ensemble_influence(queries, members)
    want = 0
    for (model, params), spec, q in zip(pairs, specs, queries, strict=True):
        train = lf.projected_grads(model, params, (x, y), spec)
        factors = fit_curvature(model, params, loader, spec, method="ggn", progress=False)
        want = want + 0.5 * lf.influence(q, train, preconditioner=lf.preconditioner(factors))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # a rerun finds the rows and factors and adds nothing
    cached = sorted((tmp_path / "ensemble").glob("member-*/curvature/*"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = lf.fit_members(pairs, loader, specs, root, method="ggn", progress=False)
    assert [len(m.train) for m in again] == [N, N]
    assert (
        len(cached) == 2 and sorted((tmp_path / "ensemble").glob("member-*/curvature/*")) == cached
    )
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # loaded, not fitted again
    torch.testing.assert_close(lf.ensemble_influence(queries, again), got)
    with pytest.raises(ValueError, match="member-1/rows was written with another projection spec"):
        lf.fit_members(pairs, loader, [specs[0], specs[0]], root, progress=False)


def test_bad_members_and_weights_are_refused_clearly(parts, members, tmp_path):
    queries = [p[4] for p in parts]
    with pytest.raises(ValueError, match="at least one member"):
        lf.ensemble_influence([], [])
    with pytest.raises(ValueError, match="2 query rows dicts for 3 members"):
        lf.ensemble_influence(queries[:2], members)
    with pytest.raises(ValueError, match=r"member 2 \(in-memory rows\): layer '0'.*shape"):
        lf.ensemble_influence([queries[0], queries[1], queries[0]], members)

    broken = {n: v.clone() for n, v in queries[1].items()}
    broken["2"][3] = float("nan")
    with pytest.raises(ValueError, match=r"member 1 \(.*m1\): non-finite query rows in layer '2'"):
        lf.ensemble_influence([queries[0], broken, queries[2]], members)

    # another training set: fewer rows, or other data ids
    short = lf.Member({n: v[:-1] for n, v in parts[0][3].items()}, members[0].preconditioner)
    with pytest.raises(ValueError, match=r"member 1 .* other data than member 0.*1 ids missing"):
        lf.ensemble_influence([queries[0], queries[0]], [members[0], short])
    model, _, spec, train, _, _ = parts[0]
    store = lf.LogStore.create(str(tmp_path / "shifted"), lf.store_schema(model, spec))
    store.append(torch.arange(N) + 100, train)
    store.flush()
    with pytest.raises(ValueError, match=r"shifted\) was logged on other data"):
        lf.ensemble_self_influence([members[0], lf.Member(store, members[0].preconditioner)])

    # a preconditioner of another member: other shapes, or another spec of the same shapes
    with pytest.raises(ValueError, match="member 1 .* fitted for another member"):
        lf.ensemble_influence(queries[:2], [members[0], lf.Member(members[1].train, members[2][1])])
    other = lf.logra(parts[1][0], rank=2, seed=7)
    loader = list(zip(*(t.split(8) for t in (torch.randn(N, 4), torch.randint(0, 3, (N,))))))
    foreign = fit_curvature(parts[1][0], parts[1][1], loader, other, method="ggn", progress=False)
    with pytest.raises(ValueError, match="fitted for another member.*different projection specs"):
        lf.ensemble_self_influence([lf.Member(members[1].train, lf.preconditioner(foreign))])
    # the same spec and shapes, fitted on other weights (another checkpoint of member 1)
    model1, params1, spec1 = parts[1][:3]
    moved = {k: v + 0.01 for k, v in params1.items()}
    stale = fit_curvature(model1, moved, loader, spec1, method="ggn", progress=False)
    with pytest.raises(ValueError, match="fitted for another member.*weights"):
        lf.ensemble_self_influence([lf.Member(members[1].train, lf.preconditioner(stale))])

    for weights, message in [
        ([1.0, 1.0], "2 weights for 3 members"),
        ([1.0, -0.1, 1.0], "finite and ≥ 0"),
        ([1.0, float("nan"), 1.0], "finite and ≥ 0"),
        ([0.0, 0.0, 0.0], "all zero"),
    ]:
        with pytest.raises(ValueError, match=message):
            lf.ensemble_influence(queries, members, weights=weights)
