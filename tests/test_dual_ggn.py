"""The dual GGN (all layers, kept as its rows, solved in sample space) against an explicit dense
GGN, and the default's choice of it."""

import pytest
import torch
from test_joint_ggn import _fitted_and_dense, _problem

import logix_func as lf
from logix_func import pipeline
from logix_func.curvature import dual_ggn
from logix_func.curvature.transform import CurvatureLogs


def _solve_dense(want, names, sizes, damping, g):
    """``(G + diag(λ_l))⁻¹ g`` by a dense solve, layers in ``names`` order."""
    lam = torch.cat([torch.full((sizes[n],), damping[n], dtype=torch.float64) for n in names])
    flat = torch.cat([g[n].reshape(len(g[n]), -1) for n in names], 1).double()
    return torch.linalg.solve(want + torch.diag(lam), flat.T).T


@pytest.mark.parametrize("rank", [None, 2])
def test_dual_ggn_solves_the_dense_ggn_of_all_layers(rank):
    spec, factors, names, want = _fitted_and_dense("dual_ggn", rank)
    # rows: 40 samples × 3 classes, the same draw in every layer; ΦᵀΦ is the dense GGN
    rows = []
    for n in names:
        f = factors["layers"][n]
        assert f["row_acts"].shape[0] == 40 and f["row_backs"].shape[:2] == (40, 3)
        outer = f["row_backs"][:, :, :, None] * f["row_acts"][:, None, None, :]
        rows.append(outer.flatten(2).flatten(0, 1))
    phi = torch.cat(rows, 1).double()
    torch.testing.assert_close(phi.T @ phi, want, rtol=1e-5, atol=1e-7)

    sizes = {n: spec.layers[n].rank_out * spec.layers[n].rank_in for n in names}
    g = {n: torch.randn(4, spec.layers[n].rank_out, spec.layers[n].rank_in) for n in names}
    for damping in (None, {names[0]: 0.3, names[1]: 2e-3}):
        pre = lf.preconditioner(factors, damping=damping)
        got = torch.cat([pre(g)[n].reshape(4, -1) for n in names], 1).double()
        expected = _solve_dense(want, names, sizes, pre.damping, g)
        assert (got - expected).norm() <= 1e-4 * expected.norm()
    # the default damping is the joint GGN's: 1 × the mean of each layer's diagonal block
    pre = lf.preconditioner(factors)
    start = 0
    for n in names:
        block = want[start : start + sizes[n], start : start + sizes[n]]
        assert pre.damping[n] == pytest.approx(block.diagonal().mean().item(), rel=1e-5)
        start += sizes[n]


def test_dual_ggn_of_many_tokens_is_its_gradients_rows():
    """Where a sample has several tokens its rows are gradients, not a Kronecker pair; a
    state that met one-token batches first expands those rows."""
    torch.manual_seed(1)
    spec_dims = {"a": (3, 4), "b": (2, 3)}

    class Spec:
        def dims(self):
            return spec_dims

        def tag(self):
            return torch.tensor(5)

    def batch(tokens):
        acts = {
            n: torch.randn(6, tokens, i, dtype=torch.float64) for n, (o, i) in spec_dims.items()
        }
        backs = {
            n: torch.randn(6, 2, tokens, o, dtype=torch.float64) for n, (o, i) in spec_dims.items()
        }
        grads = {n: torch.einsum("bdto,bti->bdoi", backs[n], acts[n]) for n in spec_dims}
        logs = {n: {"activations": acts[n], "backprops": backs[n]} for n in spec_dims}
        return grads, logs

    t = dual_ggn(dtype=torch.float64)
    state, flat = t.init(Spec()), []
    for tokens in (1, 3):
        grads, logs = batch(tokens)
        state = t.update(state, CurvatureLogs(grads, logs))
        flat.append(torch.cat([grads[n].reshape(12, -1) for n in sorted(grads)], 1))
    assert set(state["layers"]["a"]) == {"row_grads", "samples"}
    u = torch.cat(flat)
    want = u.T @ u / 12
    factors = t.finalize(state)
    phi = torch.cat([factors["layers"][n]["row_grads"].flatten(1) for n in sorted(spec_dims)], 1)
    torch.testing.assert_close(phi.T @ phi, want)
    g = {n: torch.randn(5, o, i, dtype=torch.float64) for n, (o, i) in spec_dims.items()}
    pre = lf.preconditioner(factors, damping=0.5)
    got = torch.cat([pre(g)[n].reshape(5, -1) for n in sorted(spec_dims)], 1)
    sizes = {n: o * i for n, (o, i) in spec_dims.items()}
    expected = _solve_dense(want, sorted(spec_dims), sizes, pre.damping, g)
    torch.testing.assert_close(got, expected)


def test_dual_ggn_states_merge_by_appending_rows():
    model, params, x, y = _problem()
    spec = lf.logra(model, rank=None)
    t = dual_ggn()
    batches = [
        CurvatureLogs(*lf.fisher_logs(model, params, b, spec, fisher="exact"))
        for b in ((x[:25], y[:25]), (x[25:], y[25:]))
    ]
    whole = t.init(spec)
    for logs in batches:
        whole = t.update(whole, logs)
    merged = lf.merge_states(*[t.update(t.init(spec), logs) for logs in batches])
    for n in spec.layers:
        for key, value in whole["layers"][n].items():
            torch.testing.assert_close(merged["layers"][n][key], value)


def test_auto_takes_the_dual_ggn_where_a_layer_is_too_wide(monkeypatch):
    model, params, x, y = _problem()
    spec = lf.logra(model, rank=None)  # k = 7·6 = 42 and 3·8 = 24
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]

    def fitted(max_ggn, max_rows):
        monkeypatch.setattr(pipeline, "AUTO_GGN_MAX", max_ggn)
        monkeypatch.setattr(pipeline, "AUTO_DUAL_ROWS", max_rows)
        factors = lf.fit_curvature(model, params, loader, spec, progress=False)
        return {n: sorted(f) for n, f in factors["layers"].items()}

    # every layer fits per layer: the per-layer GGN, as before
    assert fitted(4096, 16384) == {"0": ["C"], "2": ["C"]}
    # one layer too wide, 2 batches × 20 samples × 3 classes = 120 rows fit: the dual GGN
    assert fitted(30, 120) == {"0": ["row_acts", "row_backs"], "2": ["row_acts", "row_backs"]}
    # too many rows: EKFAC for the wide layer, the GGN for the other
    eigen = ["A", "QA", "QS", "S", "eigenvalues"]
    assert fitted(30, 119) == {"0": eigen, "2": ["C"]}
    # sampled labels (the empirical Fisher here): EKFAC throughout
    factors = lf.fit_curvature(model, params, loader, spec, fisher="empirical", progress=False)
    assert all(sorted(f) == eigen for f in factors["layers"].values())


def test_auto_cache_entries_follow_what_the_rule_chooses(monkeypatch, tmp_path):
    model, params, x, y = _problem()
    spec = lf.logra(model, rank=None)
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    cache = tmp_path / "cache"
    monkeypatch.setattr(pipeline, "AUTO_GGN_MAX", 30)

    def fitted(max_rows):
        monkeypatch.setattr(pipeline, "AUTO_DUAL_ROWS", max_rows)
        factors = lf.fit_curvature(model, params, loader, spec, progress=False, cache=str(cache))
        return sorted(factors["layers"]["0"])

    assert fitted(120) == ["row_acts", "row_backs"]  # the dual GGN, saved
    # the same call under another rule: EKFAC is fitted, not the dual GGN's entry found
    assert fitted(119) == ["A", "QA", "QS", "S", "eigenvalues"]
    assert fitted(120) == ["row_acts", "row_backs"]  # found again
    assert len(list(cache.iterdir())) == 2


def test_dual_ggn_refusals():
    model, params, x, y = _problem()
    spec = lf.logra(model, rank=None)
    factors = lf.fit_curvature(
        model, params, [(x, y)], spec, method="dual_ggn", fisher="exact", progress=False
    )
    with pytest.raises(ValueError, match="divides by each layer's damping"):
        lf.preconditioner(factors, damping=0.0)
    partial = {
        **factors,
        "layers": {
            **factors["layers"],
            "2": {k: v[:-3] for k, v in factors["layers"]["2"].items()},
        },
    }
    with pytest.raises(ValueError, match="rows of different counts"):
        lf.preconditioner(partial)
    joint = lf.fit_curvature(
        model, params, [(x, y)], spec, method="joint_ggn", fisher="exact", progress=False
    )
    mixed = {**factors, "layers": {"0": factors["layers"]["0"], "2": joint["layers"]["2"]}}
    with pytest.raises(ValueError, match="mix joint GGN rows"):
        lf.preconditioner(mixed)
    with pytest.raises(ValueError, match="needs the model's own label distribution"):
        lf.fit_curvature(
            model, params, [(x, y)], spec, method="dual_ggn", fisher="empirical", progress=False
        )


def test_dual_ggn_update_compiles_fullgraph():
    model, params, x, y = _problem()
    spec = lf.logra(model, rank=2, seed=1)
    logs = CurvatureLogs(*lf.fisher_logs(model, params, (x, y), spec, fisher="exact"))
    t = dual_ggn()
    state = t.update(t.init(spec), logs)  # rows already there: the update appends to them
    got = torch.compile(t.update, fullgraph=True)(state, logs)
    want = t.update(state, logs)
    for name, layer in want["layers"].items():
        for key, value in layer.items():
            torch.testing.assert_close(got["layers"][name][key], value)
