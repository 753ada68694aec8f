"""The joint GGN (all layers, cross-layer blocks included) against an explicit dense GGN."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import logix_func as lf
from logix_func.curvature import joint_ggn
from logix_func.curvature.transform import CurvatureLogs


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    return model, params, x, y


def _dense_ggn(model, params, x, names, project=None):
    """``(1/N) Σ_n J_nᵀ (diag p − p pᵀ) J_n`` over ``[W | b]`` of each layer, layers in
    ``names`` order, from a for-loop of per-example Jacobians."""

    def logits(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    total = 0
    for xi in x:
        jac = jacrev(logits)(params, xi)
        p = torch.softmax(logits(params, xi), -1)
        blocks = []
        for n in names:
            j = torch.cat([jac[f"{n}.weight"], jac[f"{n}.bias"][..., None]], -1)  # [C, out, in+1]
            if project is not None:
                p_out, p_in = project[n]
                j = p_out @ j @ p_in.T
            blocks.append(j.reshape(len(p), -1))
        jf = torch.cat(blocks, 1)
        total = total + jf.T @ (torch.diag(p) - torch.outer(p, p)) @ jf
    return total / len(x)


def _fitted_and_dense(method, rank):
    """``(spec, factors, names, want)``: ``fit_curvature(method=...)`` over two batches of
    `_problem` (exact Fisher) and the dense GGN ``want`` of its layers in ``names`` order."""
    model, params, x, y = _problem()
    spec = lf.logra(model, rank=rank, seed=3)
    loader = [(x[:15], y[:15]), (x[15:], y[15:])]
    factors = lf.fit_curvature(
        model, params, loader, spec, method=method, fisher="exact", progress=False
    )
    names = sorted(spec.layers)
    project = None
    if rank is not None:
        project = {n: spec.matrices(n, dtype=torch.float64) for n in names}
    return spec, factors, names, _dense_ggn(model, params, x, names, project)


@pytest.mark.parametrize("rank", [None, 2])
def test_joint_ggn_is_the_dense_ggn_of_all_layers(rank):
    spec, factors, names, want = _fitted_and_dense("joint_ggn", rank)
    got = torch.cat([factors["layers"][n]["rows"] for n in names]).double()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # its cross-layer blocks are not zero: a per-layer GGN drops them
    k0 = factors["layers"][names[0]]["rows"].shape[0]
    assert want[:k0, k0:].abs().max() > 1e-3 * want.abs().max()

    pre = lf.preconditioner(factors)
    g = {n: torch.randn(3, spec.layers[n].rank_out, spec.layers[n].rank_in) for n in names}
    solved = pre(g)
    damping = torch.cat(
        [torch.full((factors["layers"][n]["rows"].shape[0],), pre.damping[n]) for n in names]
    ).double()
    flat = torch.cat([g[n].reshape(3, -1) for n in names], 1).double()
    want_solved = torch.linalg.solve(want + torch.diag(damping), flat.T).T
    got_solved = torch.cat([solved[n].reshape(3, -1) for n in names], 1).double()
    # float32 factors: compare as a whole (a relative error of the solve, not entry by entry)
    assert (got_solved - want_solved).norm() <= 1e-4 * want_solved.norm()
    # the default damping is 1 × the mean of each layer's own diagonal block (JOINT_DAMPING)
    start = 0
    for n in names:
        k = factors["layers"][n]["rows"].shape[0]
        block = want[start : start + k, start : start + k]
        assert pre.damping[n] == pytest.approx(1.0 * block.diagonal().mean().item(), rel=1e-5)
        start += k


def test_joint_ggn_follows_the_contract():
    model, params, x, y = _problem()
    spec = lf.logra(model, rank=None)
    t = joint_ggn(dtype=torch.float64)
    batches = [
        lf.fisher_logs(model, params, b, spec, fisher="exact")
        for b in ((x[:25], y[:25]), (x[25:], y[25:]))
    ]
    whole = t.init(spec)
    for logs in batches:
        whole = t.update(whole, CurvatureLogs(*logs))
    parts = [t.update(t.init(spec), CurvatureLogs(*logs)) for logs in batches]
    merged = lf.merge_states(*parts)
    for n in spec.layers:
        torch.testing.assert_close(merged["layers"][n]["rows"], whole["layers"][n]["rows"])
    # the gradients' route (no logs) and the one-token Kronecker route agree
    grads, logs = batches[0]
    by_grads = t.update(t.init(spec), CurvatureLogs(grads, None))
    by_tokens = t.update(t.init(spec), CurvatureLogs(grads, logs))
    for n in spec.layers:
        torch.testing.assert_close(by_grads["layers"][n]["rows"], by_tokens["layers"][n]["rows"])
    # without its cross-layer blocks it is the per-layer GGN (method="ggn")
    per_layer = lf.fit_curvature(
        model, params, [(x, y)], spec, method="ggn", fisher="exact", progress=False
    )
    factors = t.finalize(whole)
    start = 0
    for n in sorted(spec.layers):
        rows = factors["layers"][n]["rows"]
        block = rows[:, start : start + rows.shape[0]]
        torch.testing.assert_close(block.float(), per_layer["layers"][n]["C"], rtol=1e-4, atol=1e-6)
        start += rows.shape[0]


def test_joint_ggn_refusals():
    model, params, x, y = _problem()
    spec = lf.logra(model, rank=None)
    with pytest.raises(ValueError, match="needs the model's own label distribution"):
        lf.fit_curvature(
            model, params, [(x, y)], spec, method="joint_ggn", fisher="empirical", progress=False
        )
    factors = lf.fit_curvature(
        model, params, [(x, y)], spec, method="joint_ggn", fisher="exact", progress=False
    )
    partial = {**factors, "layers": {"0": factors["layers"]["0"]}}
    with pytest.raises(ValueError, match="do not span"):
        lf.preconditioner(partial)
    with pytest.raises(ValueError, match="not positive definite"):
        lf.preconditioner(factors, damping=-1.0)
