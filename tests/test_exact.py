"""exact_curvature against dense algebra built independently in each test (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix_func as lf

DT = torch.float64


def joined(weight, bias):
    """``[W | b]``: the gradient-matrix layout of a linear layer."""
    return torch.cat([weight, bias[:, None]], dim=1).detach()


def dense_hessian(loss, matrix):
    """Hessian of ``loss(matrix)`` in the row-major vec of ``matrix``: ``[k, k]``."""
    k = matrix.numel()
    return torch.autograd.functional.hessian(loss, matrix).reshape(k, k)


def softmax_curvature(logits):
    """Hessian of the cross-entropy in the logits, per sample: ``[N, C, C]``."""
    p = logits.softmax(-1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


# -------------------------------------------------------------------------------------------
# models with their hand-written forward passes


def mlp_data(n=24):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(n, 4, dtype=DT) * 2, torch.randint(0, 3, (n,))
    return model, dict(model.named_parameters()), x, y


def mlp_logits(p, x):
    return torch.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]


def mlp_layer_loss(params, x, y, layer):
    """Mean cross-entropy as a function of one layer's ``[W | b]`` (the others fixed)."""
    p = {k: v.detach() for k, v in params.items()}

    def loss(m):
        q = {**p, f"{layer}.weight": m[:, :-1], f"{layer}.bias": m[:, -1]}
        return F.cross_entropy(mlp_logits(q, x), y)

    return loss, joined(p[f"{layer}.weight"], p[f"{layer}.bias"])


# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_logistic_regression_ggn_equals_hessian_equals_closed_form(kind):
    model = nn.Linear(6, 4).to(DT)
    x, y = torch.randn(40, 6, dtype=DT), torch.randint(0, 4, (40,))
    xt = torch.cat([x, torch.ones(40, 1, dtype=DT)], 1)
    curv = softmax_curvature(model(x).detach())
    # (diag p - p pᵀ) ⊗ x̃ x̃ᵀ, averaged: vec row-major over [out, in + 1]
    expected = torch.einsum("nab,ni,nj->aibj", curv, xt, xt).reshape(28, 28) / 40
    spec = lf.logra(model, rank=None)
    got = lf.exact_curvature(model, dict(model.named_parameters()), (x, y), spec, kind=kind)
    torch.testing.assert_close(got["layers"][""]["C"], expected, rtol=1e-10, atol=1e-12)
    f = got["layers"][""]
    torch.testing.assert_close(f["Q"] @ torch.diag(f["eigenvalues"]) @ f["Q"].T, expected)


def test_float_targets_give_the_least_squares_curvature():
    model = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT)
    xt = torch.cat([x, torch.ones(10, 1, dtype=DT)], 1)
    expected = torch.kron(torch.eye(2, dtype=DT), xt.T @ xt / 10)  # 0.5·SSE summed per sample
    spec = lf.logra(model, rank=None)
    for kind in ("ggn", "hessian"):
        got = lf.exact_curvature(model, dict(model.named_parameters()), (x, y), spec, kind=kind)
        torch.testing.assert_close(got["layers"][""]["C"], expected)


def test_mlp_hessian_blocks_equal_autograd_hessian():
    model, params, x, y = mlp_data()
    spec = lf.logra(model, rank=None)
    got = lf.exact_curvature(model, params, (x, y), spec, kind="hessian", chunk_size=7)
    for layer in ("0", "2"):
        expected = dense_hessian(*mlp_layer_loss(params, x, y, layer))
        torch.testing.assert_close(got["layers"][layer]["C"], expected, rtol=1e-9, atol=1e-12)
        f = got["layers"][layer]
        torch.testing.assert_close(f["Q"] @ torch.diag(f["eigenvalues"]) @ f["Q"].T, expected)
    # the hidden layer's Hessian is indefinite here, and its eigenvalues are kept as they are
    assert got["layers"]["0"]["eigenvalues"].min() < -1e-3


def test_mlp_ggn_blocks_equal_jacobian_algebra():
    model, params, x, y = mlp_data()
    spec = lf.logra(model, rank=None)
    got = lf.exact_curvature(model, params, (x, y), spec, kind="ggn")
    hessian = lf.exact_curvature(model, params, (x, y), spec, kind="hessian")
    p = {k: v.detach() for k, v in params.items()}
    curv = softmax_curvature(mlp_logits(p, x))
    for layer in ("0", "2"):
        m0 = joined(p[f"{layer}.weight"], p[f"{layer}.bias"])

        def logits(m, layer=layer):
            return mlp_logits({**p, f"{layer}.weight": m[:, :-1], f"{layer}.bias": m[:, -1]}, x)

        jac = torch.autograd.functional.jacobian(logits, m0).reshape(len(x), 3, -1)
        expected = torch.einsum("nci,ncd,ndj->ij", jac, curv, jac) / len(x)
        torch.testing.assert_close(got["layers"][layer]["C"], expected, rtol=1e-9, atol=1e-12)
    # the output layer is linear in its parameters (GGN = Hessian), the hidden one is not
    torch.testing.assert_close(got["layers"]["2"]["C"], hessian["layers"]["2"]["C"])
    assert not torch.allclose(got["layers"]["0"]["C"], hessian["layers"]["0"]["C"], atol=1e-3)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_projected_block_is_p_h_pt(kind):
    model, params, x, y = mlp_data()
    full = lf.exact_curvature(model, params, (x, y), lf.logra(model, rank=None), kind=kind)
    spec = lf.logra(model, rank=(2, 3), seed=11)
    got = lf.exact_curvature(model, params, (x, y), spec, kind=kind)
    for layer in ("0", "2"):
        p_out, p_in = spec.matrices(layer, dtype=DT)
        assert got["layers"][layer]["C"].shape == (6, 6)
        proj = torch.kron(p_out, p_in)
        expected = proj @ dense_hessian(*mlp_layer_loss(params, x, y, layer)) @ proj.T
        if kind == "ggn":
            expected = proj @ full["layers"][layer]["C"] @ proj.T
        torch.testing.assert_close(got["layers"][layer]["C"], expected, rtol=1e-9, atol=1e-12)


def test_ggn_equals_the_exact_fisher_of_projected_gradients():
    # for cross-entropy, E[Σ_c g_c g_cᵀ] over the label factors of diag(p) - p pᵀ is the GGN:
    # ties exact_curvature's layout to projected_grads' one, projections included
    model, params, x, y = mlp_data()
    spec = lf.logra(model, rank=(2, 3), seed=5)
    grads, _ = lf.fisher_logs(model, params, (x, y), spec, fisher="exact")
    raw = lf.curvature.raw(dtype=DT)
    fisher = raw.finalize(raw.update(raw.init(spec), grads))
    got = lf.exact_curvature(model, params, (x, y), spec, kind="ggn")
    assert got["spec"] == fisher["spec"]
    for layer in ("0", "2"):
        torch.testing.assert_close(got["layers"][layer]["C"], fisher["layers"][layer]["C"])


def test_influence_with_l2_damping_is_the_dense_newton_product():
    l2 = 0.05
    model = nn.Linear(5, 3).to(DT)
    params = dict(model.named_parameters())
    x, y = torch.randn(30, 5, dtype=DT), torch.randint(0, 3, (30,))
    xq, yq = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    theta = joined(params["weight"], params["bias"]).flatten()

    def objective(t):
        m = t.view(3, 6)
        return F.cross_entropy(x @ m[:, :-1].T + m[:, -1], y) + 0.5 * l2 * t.square().sum()

    def sample_grad(xi, yi):
        t = theta.clone().requires_grad_(True)
        m = t.view(3, 6)
        loss = F.cross_entropy(xi @ m[:, :-1].T + m[:, -1], yi, reduction="sum")
        return torch.autograd.grad(loss, t)[0]

    h = torch.autograd.functional.hessian(objective, theta)
    g_train = torch.stack([sample_grad(x[i : i + 1], y[i : i + 1]) for i in range(30)])
    g_query = torch.stack([sample_grad(xq[i : i + 1], yq[i : i + 1]) for i in range(4)])
    expected = g_query @ torch.linalg.solve(h, g_train.T)

    spec = lf.logra(model, rank=None)
    factors = lf.exact_curvature(model, params, (x, y), spec, kind="hessian")
    pre = lf.preconditioner(factors, damping=l2)
    train = lf.projected_grads(model, params, (x, y), spec)
    query = lf.projected_grads(model, params, (xq, yq), spec)
    scores = lf.influence(query, train, preconditioner=pre)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-5)


def test_batches_and_loaders_are_averaged_over_samples():
    model, params, x, y = mlp_data(n=25)
    spec = lf.logra(model, rank=None)
    one = lf.exact_curvature(model, params, (x, y), spec)
    parts = [(x[:7], y[:7]), (x[7:9], y[7:9]), (x[9:], y[9:])]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    for data in (parts, iter(parts), loader):
        got = lf.exact_curvature(model, params, data, spec)
        for layer in ("0", "2"):
            torch.testing.assert_close(got["layers"][layer]["C"], one["layers"][layer]["C"])


class EmbedConv(nn.Module):
    """tokens → Embedding(7, 3) → Conv1d(3, 4, 2) → tanh → mean over positions → Linear(4, 2)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.conv = nn.Conv1d(3, 4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens):
        h = self.conv(self.emb(tokens).transpose(1, 2)).tanh().mean(-1)
        return self.head(h)


def test_conv_and_embedding_blocks_follow_the_gradient_layout():
    model = EmbedConv().to(DT)
    params = dict(model.named_parameters())
    tokens, y = torch.randint(0, 7, (12, 5)), torch.randint(0, 2, (12,))
    p = {k: v.detach() for k, v in params.items()}
    got = lf.exact_curvature(model, params, (tokens, y), lf.logra(model, rank=None), kind="hessian")

    def loss(q):
        return F.cross_entropy(torch.func.functional_call(model, {**p, **q}, (tokens,)), y)

    # embedding: G = weightᵀ [dim, num]; conv: G = [weight.flatten(1) | bias]
    emb = dense_hessian(lambda m: loss({"emb.weight": m.T}), p["emb.weight"].T.contiguous())
    w = p["conv.weight"]
    conv = dense_hessian(
        lambda m: loss({"conv.weight": m[:, :-1].reshape(w.shape), "conv.bias": m[:, -1]}),
        joined(w.flatten(1), p["conv.bias"]),
    )
    torch.testing.assert_close(got["layers"]["emb"]["C"], emb)
    torch.testing.assert_close(got["layers"]["conv"]["C"], conv)


def test_bad_inputs_are_refused_with_clear_errors():
    model, params, x, y = mlp_data()
    spec = lf.logra(model, rank=None)
    with pytest.raises(ValueError, match="kind must be"):
        lf.exact_curvature(model, params, (x, y), spec, kind="fisher")
    with pytest.raises(ValueError, match="no batches"):
        lf.exact_curvature(model, params, [], spec)
    with pytest.raises(ValueError, match="another model"):
        other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        lf.exact_curvature(model, params, (x, y), lf.logra(other, rank=None))
    factors = lf.exact_curvature(model, params, (x, y), spec, kind="hessian")
    lowest = factors["layers"]["0"]["eigenvalues"].min().item()
    with pytest.raises(ValueError, match="negative eigenvalue"):
        lf.preconditioner(factors, damping=-lowest / 2)
    out = lf.preconditioner(factors, damping=-2 * lowest)(
        lf.projected_grads(model, params, (x, y), spec)
    )
    assert all(torch.isfinite(v).all() for v in out.values())


def test_joint_exact_curvature_is_the_dense_hessian_of_all_layers():
    """``joint=True``: the Hessian of every layer together (cross-layer blocks included), as
    block rows, against ``torch.autograd.functional.hessian`` of the flattened ``[W | b]``."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    spec = lf.logra(model, rank=None)
    data = [(x[:15], y[:15]), (x[15:], y[15:])]
    factors = lf.exact_curvature(model, params, data, spec, kind="hessian", joint=True)
    names = sorted(spec.layers)
    shapes = {
        n: (params[f"{n}.weight"].shape[0], params[f"{n}.weight"].shape[1] + 1) for n in names
    }

    def loss(theta):
        moved, start = {}, 0
        for n in names:
            m = theta[start : start + shapes[n][0] * shapes[n][1]].reshape(shapes[n])
            moved[f"{n}.weight"], moved[f"{n}.bias"] = m[:, :-1], m[:, -1]
            start += m.numel()
        return nn.functional.cross_entropy(functional_call(model, moved, (x,)), y)

    theta = torch.cat(
        [
            torch.cat([params[f"{n}.weight"], params[f"{n}.bias"][:, None]], 1).flatten()
            for n in names
        ]
    )
    want = torch.autograd.functional.hessian(loss, theta)
    got = torch.cat([factors["layers"][n]["rows"] for n in names])
    torch.testing.assert_close(got, want)
    assert want[:56, 56:].abs().max() > 1e-3  # cross-layer blocks are there
    # one Cholesky factor over all layers; an indefinite Hessian needs a larger damping
    lowest = torch.linalg.eigvalsh(want)[0].item()
    assert lowest < 0
    with pytest.raises(ValueError, match="pass a larger damping"):
        lf.preconditioner(factors, damping=-lowest / 2)
    pre = lf.preconditioner(factors, damping=-lowest + 0.1)
    g = {n: torch.randn(2, *shapes[n], dtype=torch.float64) for n in names}
    solved = torch.cat([pre(g)[n].reshape(2, -1) for n in names], 1)
    flat = torch.cat([g[n].reshape(2, -1) for n in names], 1)
    shifted = want + (-lowest + 0.1) * torch.eye(len(want), dtype=torch.float64)
    torch.testing.assert_close(solved, torch.linalg.solve(shifted, flat.T).T)
