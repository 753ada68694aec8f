"""KFAC, EKFAC and raw curvature against explicit dense matrices."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix_func as lf


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def layer_matrix_grads(model, x):
    """Per-layer Jacobians of the logits w.r.t. [W | b]: {layer: [N, C, out*(in+1)]}."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = dict(model.named_parameters())
    jac = {}
    for name, m in linears.items():
        wb = torch.cat([m.weight, m.bias[:, None]], 1).detach()

        def logits(wb, xi, name=name):
            p = {**params, f"{name}.weight": wb[:, :-1], f"{name}.bias": wb[:, -1]}
            return torch.func.functional_call(model, p, (xi[None],))[0]

        j = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(wb, x)
        jac[name] = j.flatten(2)
    return jac


def dense_ggn_blocks(model, x, targets):
    """Block-diagonal GGN of the mean loss, one dense block per Linear layer."""
    out = model(x)
    if targets.is_floating_point():
        hess = torch.eye(out.shape[1]).expand(len(x), -1, -1)
    else:
        p = out.softmax(-1)
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return {
        n: torch.einsum("nci,ncd,ndj->ij", j, hess, j) / len(x)
        for n, j in layer_matrix_grads(model, x).items()
    }


def fit(model, batch, fisher, *, chunks=1, transform=None):
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=None)
    k = transform or lf.kfac(fisher, dtype=torch.float64)
    state = k.init(spec)
    xs, ys = batch[0].chunk(chunks), batch[1].chunk(chunks)
    for i, (xc, yc) in enumerate(zip(xs, ys)):
        _, logs = lf.fisher_logs(model, params, (xc, yc), spec, fisher=fisher, seed=i)
        state = k.update(state, logs)
    return spec, state, k.finalize(state)


def apply_dense(block, damping, g):
    eye = torch.eye(block.shape[0])
    return torch.linalg.solve(block + damping * eye, g.reshape(-1)).reshape(g.shape)


def random_grads(model, n=3):
    return {
        name: torch.randn(n, m.out_features, m.in_features + 1)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: nn.Linear(5, 4),
        lambda: nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)),
    ],
    ids=["one-layer", "deep-linear"],
)
def test_kfac_is_exact_where_theory_says_so(make_model):
    model = make_model()
    x = torch.randn(40, 5)
    y = torch.randn(40, model(x).shape[1])
    _, _, factors = fit(model, (x, y), "exact")
    blocks = dense_ggn_blocks(model, x, y)
    pre = lf.preconditioner(factors, damping=1e-3)
    grads = random_grads(model)
    got = pre(grads)
    for name, g in grads.items():
        for i in range(len(g)):
            want = apply_dense(blocks[name], 1e-3, g[i])
            torch.testing.assert_close(got[name][i], want, rtol=1e-6, atol=1e-8)


def test_ekfac_is_at_least_as_close_as_kfac_on_an_mlp():
    """EKFAC is the best diagonal in KFAC's eigenbasis, so it is closer to the dense GGN block;
    its damped inverse is also closer on the training gradients (the directions influence uses).
    """
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    x, y = torch.randn(64, 6), torch.randint(0, 5, (64,))
    params = dict(model.named_parameters())
    spec, _, kf = fit(model, (x, y), "exact")
    ek = lf.ekfac(kf)
    grads, _ = lf.fisher_logs(model, params, (x, y), spec, fisher="exact")
    ek_factors = ek.finalize(ek.update(ek.init(), grads))
    train_grads = lf.projected_grads(model, params, (x, y), spec)
    for name, block in dense_ggn_blocks(model, x, y).items():
        d = block.shape[0]
        damping = 0.1 * torch.linalg.eigvalsh(block).mean().item()
        dense_inv = torch.linalg.inv(block + damping * torch.eye(d))
        g = train_grads[name].reshape(len(x), -1).T  # [d, N]

        def curvature(factors, name=name):
            f = factors["layers"][name]
            q = torch.kron(f["QS"], f["QA"])
            return q @ torch.diag(f["eigenvalues"].reshape(-1)) @ q.T

        def inverse_on_grads(factors, name=name, damping=damping, g=g):
            layer = {"spec": factors["spec"], "layers": {name: factors["layers"][name]}}
            pre = lf.preconditioner(layer, damping={name: damping})
            shape = factors["layers"][name]["eigenvalues"].shape
            return pre({name: g.T.reshape(-1, *shape)})[name].reshape(g.shape[1], -1).T

        def dist(a, b):
            return torch.linalg.norm(a - b).item()

        assert dist(curvature(ek_factors), block) < dist(curvature(kf), block)
        assert dist(inverse_on_grads(ek_factors), dense_inv @ g) < dist(
            inverse_on_grads(kf), dense_inv @ g
        )


def test_empirical_and_true_fisher_match_their_definitions():
    model = nn.Linear(4, 3)
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    logits = model(x)
    delta = torch.stack(
        [
            torch.autograd.grad(F.cross_entropy(logits[i], y[i], reduction="sum"), logits)[0][i]
            for i in range(len(x))
        ]
    )
    _, _, emp = fit(model, (x, y), "empirical")
    torch.testing.assert_close(emp["layers"][""]["S"], delta.T @ delta / len(x))

    p = logits.softmax(-1).detach()
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    many = (x.repeat(300, 1), y.repeat(300))
    _, _, true = fit(model, many, "true", chunks=10)
    assert torch.linalg.norm(true["layers"][""]["S"] - expected) < 0.05 * torch.linalg.norm(
        expected
    )
    _, _, exact = fit(model, (x, y), "exact")
    torch.testing.assert_close(exact["layers"][""]["S"], expected)


def test_auto_fisher_is_exact_for_few_classes_and_sampled_for_many():
    few, many = nn.Linear(4, 3), nn.Linear(4, 17)
    x = torch.randn(30, 4)
    for model, classes, expected in [(few, 3, "exact"), (many, 17, "true")]:
        y = torch.randint(0, classes, (30,))
        params = dict(model.named_parameters())
        spec = lf.logra(model, rank=None)
        got = lf.fisher_logs(model, params, (x, y), spec, fisher="auto", seed=3)
        want = lf.fisher_logs(model, params, (x, y), spec, fisher=expected, seed=3)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert got[0][""].shape[1] == (classes if expected == "exact" else 1)
    params, spec, batch = dict(few.named_parameters()), lf.logra(few, rank=None), (x, y % 3)
    with pytest.raises(ValueError, match="pass label_sampler=.*or fisher='empirical'"):
        lf.fisher_logs(few, params, batch, spec, loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="fisher must be one of"):
        lf.fisher_logs(few, params, batch, spec, fisher="sampled")


def test_chunked_and_merged_updates_equal_one_pass():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=3, seed=1)
    k = lf.kfac("empirical", dtype=torch.float64)
    _, logs = lf.fisher_logs(model, params, (x, y), spec, fisher="empirical")
    one = k.update(k.init(spec), logs)
    parts = []
    for xs, ys in zip(x.chunk(3), y.chunk(3)):
        _, lg = lf.fisher_logs(model, params, (xs, ys), spec, fisher="empirical")
        parts.append(k.update(k.init(spec), lg))
    merged = lf.merge_states(*parts)
    chained = k.init(spec)
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        chained = k.update(
            chained, lf.fisher_logs(model, params, (xs, ys), spec, fisher="empirical")[1]
        )
    for name in one["layers"]:
        for key in ("A", "S", "tokens", "samples"):
            torch.testing.assert_close(merged["layers"][name][key], one["layers"][name][key])
            torch.testing.assert_close(chained["layers"][name][key], one["layers"][name][key])


def test_rank_deficient_covariances_give_finite_results():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(3, 6).repeat(5, 1)  # 3 distinct inputs, rank-deficient A
    x[:, 0] = 0.0
    y = torch.randint(0, 4, (15,))
    _, _, factors = fit(model, (x, y), "empirical")
    for damping in (None, 1e-6):
        out = lf.preconditioner(factors, damping)(random_grads(model))
        assert all(torch.isfinite(v).all() for v in out.values())
    with pytest.raises(ValueError, match="zero eigenvalues"):
        lf.preconditioner(factors, damping=0.0)


def test_damping_is_per_layer_and_never_accumulates():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(32, 6) * 5, torch.randint(0, 4, (32,))
    _, _, factors = fit(model, (x, y), "empirical")
    pre = lf.preconditioner(factors)
    for name, f in factors["layers"].items():
        assert pre.damping[name] == pytest.approx(0.1 * f["eigenvalues"].mean().item())
    assert pre.damping["0"] != pytest.approx(pre.damping["2"])
    grads = random_grads(model)
    first, second = pre(grads), pre(grads)
    for name in grads:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert lf.preconditioner(None)(grads)["0"] is grads["0"]


def test_raw_covariance_and_its_preconditioner_match_dense_algebra():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=2, seed=3)
    grads = lf.projected_grads(model, params, (x, y), spec)
    r = lf.curvature.raw(dtype=torch.float64)
    factors = r.finalize(r.update(r.init(spec), grads))
    queries = random_grads(model)
    queries = {n: q[:, :2, :2] for n, q in queries.items()}
    got = lf.preconditioner(factors, damping=0.01)(queries)
    for name, g in grads.items():
        flat = g.reshape(len(x), -1)
        cov = flat.T @ flat / len(x)
        torch.testing.assert_close(factors["layers"][name]["C"], cov)
        for i in range(len(queries[name])):
            want = apply_dense(cov, 0.01, queries[name][i])
            torch.testing.assert_close(got[name][i], want)


@pytest.mark.parametrize("rank", [None, 3])
def test_ggn_method_is_the_dense_per_layer_ggn_in_the_projected_space(rank):
    """``fit_curvature(method="ggn")`` = ``P B Pᵀ``, ``B`` the dense GGN block of the mean loss
    and ``P = P_out ⊗ P_in``; its preconditioner solves against that matrix."""
    from logix_func.pipeline import fit_curvature

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=rank, seed=1)
    loader = list(zip(x.split(8), y.split(8)))
    factors = fit_curvature(model, params, loader, spec, method="ggn", progress=False)
    blocks = dense_ggn_blocks(model, x, y)
    queries = lf.projected_grads(model, params, (x[:3], y[:3]), spec)
    got = lf.preconditioner(factors, damping=1e-2)(queries)
    for name, block in blocks.items():
        p_out, p_in = spec.matrices(name)
        p = torch.kron(p_out, p_in)
        want = p @ block @ p.T
        torch.testing.assert_close(
            factors["layers"][name]["C"].double(), want, atol=1e-6, rtol=1e-4
        )
        for i in range(3):
            solved = apply_dense(want, 1e-2, queries[name][i])
            torch.testing.assert_close(got[name][i].double(), solved, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="method='ggn' needs the model's own label"):
        fit_curvature(model, params, loader, spec, method="ggn", fisher="empirical")


def test_auto_method_takes_the_dense_ggn_where_it_fits_and_ekfac_elsewhere(monkeypatch):
    """``method="auto"``: the dense GGN block for layers with ``k ≤ AUTO_GGN_MAX``, EKFAC's
    factors for the others, one preconditioner over both (where the dual GGN's rows do not
    fit: ``tests/test_dual_ggn.py`` covers where they do)."""
    from logix_func import pipeline

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # k = 25 and 18
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=None)
    loader = list(zip(x.split(8), y.split(8)))

    def fit(method):
        return pipeline.fit_curvature(model, params, loader, spec, method=method, progress=False)

    monkeypatch.setattr(pipeline, "AUTO_DUAL_ROWS", 0)
    monkeypatch.setattr(pipeline, "AUTO_GGN_MAX", 20)
    auto, ekfac = fit("auto"), fit("ekfac")
    want = dense_ggn_blocks(model, x, y)["2"]
    assert set(auto["layers"]["2"]) == {"C"}
    torch.testing.assert_close(auto["layers"]["2"]["C"].double(), want, atol=1e-6, rtol=1e-4)
    for key, value in ekfac["layers"]["0"].items():
        torch.testing.assert_close(auto["layers"]["0"][key], value)
    assert auto["spec"] == ekfac["spec"] and auto["weights"] == ekfac["weights"]
    queries = lf.projected_grads(model, params, (x[:3], y[:3]), spec)
    got = lf.preconditioner(auto, damping=1e-2)(queries)
    torch.testing.assert_close(got["0"], lf.preconditioner(ekfac, damping=1e-2)(queries)["0"])
    for i in range(3):
        solved = apply_dense(want, 1e-2, queries["2"][i])
        torch.testing.assert_close(got["2"][i].double(), solved, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(pipeline, "AUTO_GGN_MAX", 25)  # every layer fits: the GGN alone
    assert set(fit("auto")["layers"]["0"]) == {"C"}
    monkeypatch.setattr(pipeline, "AUTO_GGN_MAX", 10)  # none fits: EKFAC alone
    assert all("eigenvalues" in f for f in fit("auto")["layers"].values())


def test_auto_method_is_ekfac_unless_the_fisher_is_exact():
    """Sampled labels (``fisher="true"``, or ``"auto"`` with more than 16 classes) and the
    empirical Fisher: ``method="auto"`` gives EKFAC's factors, bit for bit."""
    from logix_func import pipeline

    def same(model, y, **kw):
        x = torch.randn(len(y), 4)
        params, spec = dict(model.named_parameters()), lf.logra(model, rank=None)
        loader = list(zip(x.split(8), y.split(8)))
        fit = lambda m: pipeline.fit_curvature(  # noqa: E731
            model, params, loader, spec, method=m, progress=False, **kw
        )
        auto, ekfac = fit("auto"), fit("ekfac")
        for name, factors in ekfac["layers"].items():
            assert auto["layers"][name].keys() == factors.keys() and "QA" in factors
            for key, value in factors.items():
                assert torch.equal(auto["layers"][name][key], value)

    small = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # k = 25 and 15
    for fisher in ("true", "empirical"):
        same(small, torch.randint(0, 3, (20,)), fisher=fisher)
    many = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 20))  # 20 classes: sampled
    same(many, torch.randint(0, 20, (20,)))
    once = iter([(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
    spec = lf.logra(small, rank=None)
    with pytest.raises(TypeError, match="not a one-shot list_iterator"):
        pipeline.fit_curvature(small, dict(small.named_parameters()), once, spec, progress=False)


def test_auto_ggn_layers_fill_the_budget_smallest_first(monkeypatch):
    from logix_func import pipeline

    dims = {"a": (64, 64), "b": (2, 3), "c": (10, 10), "d": (65, 64)}  # k = 4096, 6, 100, 4160
    assert pipeline.auto_ggn_layers(dims) == ["a", "b", "c"]  # d: k > AUTO_GGN_MAX
    monkeypatch.setattr(pipeline, "AUTO_GGN_BUDGET", 4 * (6**2 + 100**2))
    assert pipeline.auto_ggn_layers(dims) == ["b", "c"]
    monkeypatch.setattr(pipeline, "AUTO_GGN_BUDGET", 4 * 100**2)
    assert pipeline.auto_ggn_layers(dims) == ["b"]


def test_raw_kronecker_route_and_cholesky_preconditioner_match_the_plain_ones():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=3, seed=2)
    grads, logs = lf.fisher_logs(model, params, (x, y), spec, fisher="exact")
    r = lf.curvature.raw(dtype=torch.float64)
    plain = r.finalize(r.update(r.init(spec), grads))
    bare = lf.curvature.raw(dtype=torch.float64, eigh=False)
    kron = bare.finalize(bare.update(bare.init(spec), grads, logs))
    queries = lf.projected_grads(model, params, (x[:4], y[:4]), spec)
    for damping in (None, 1e-2):
        want = lf.preconditioner(plain, damping)
        got = lf.preconditioner(kron, damping)
        assert got.damping == pytest.approx(want.damping)
        for name, value in got(queries).items():
            torch.testing.assert_close(kron["layers"][name]["C"], plain["layers"][name]["C"])
            torch.testing.assert_close(value, want(queries)[name])
    indefinite = {"spec": kron["spec"], "layers": {"0": {"C": -torch.eye(9)}}}
    with pytest.raises(ValueError, match="layer '0': C \\+ λI is not positive definite"):
        lf.preconditioner(indefinite, damping=0.5)


def test_bad_input_is_refused_clearly():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=2, seed=0)
    k = lf.kfac("empirical")
    state = k.init(spec)
    _, logs = lf.fisher_logs(model, params, (x, y), spec, fisher="empirical")

    bad = {n: dict(v) for n, v in logs.items()}
    bad["2"]["backprops"] = bad["2"]["backprops"].clone()
    bad["2"]["backprops"][4] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite backprops in layer '2'.*\[4\]"):
        k.update(state, bad)
    with pytest.raises(ValueError, match=r"missing \['2'\]"):
        k.update(state, {"0": logs["0"]})
    other = lf.logra(model, rank=3, seed=0)
    with pytest.raises(ValueError, match="another spec"):
        k.update(k.init(other), logs)
    with pytest.raises(ValueError, match="different projection specs"):
        lf.merge_states(state, k.init(lf.logra(model, rank=2, seed=1)))
    with pytest.raises(ValueError, match="fisher must be"):
        lf.kfac("fake")


def test_state_saves_and_loads_beside_the_logs(tmp_path):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    _, state, factors = fit(model, (x, y), "empirical")
    for url in (str(tmp_path / "run" / "kfac.pt"), "memory://run/kfac.pt"):
        lf.save_state(factors, url)
        back = lf.load_state(url)
        for name, f in factors["layers"].items():
            for key, v in f.items():
                torch.testing.assert_close(back["layers"][name][key], v, rtol=0, atol=0)
        assert torch.equal(back["spec"], factors["spec"])
