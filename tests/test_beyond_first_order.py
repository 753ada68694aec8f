"""The beyond-first-order benchmark's pieces against explicit solves on a tiny MLP.

``benchmarks/beyond_first_order.py`` solves the GGN through its Gram form, corrects scores for a
finite toggle of one example and for the others' random weights, and unrolls `digits.train_mlps`'s
Adam as a function; each is checked here against explicit matrices or `torch.optim.Adam`.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.autograd.functional import jacobian

from benchmarks import beyond_first_order as bfo
from benchmarks import dense_curvature as dc
from logix_func.demo import digits

WD, LAM = 1e-3, 1e-2


@pytest.fixture(scope="module")
def problem():
    split = digits.digits_split()
    data = SimpleNamespace(
        train_x=split.train_x[:12],
        train_y=split.train_y[:12],
        test_x=split.test_x[:5],
        test_y=split.test_y[:5],
    )
    model = digits.mlp_model(3)  # D = 195 + 40 = 235
    return dc.Problem(model, digits.mlp_init(1, 3), data, WD)


def per_example_ggns(problem) -> list[torch.Tensor]:
    """``J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` of every training example, by a Jacobian loop."""
    out = []
    for xi in problem.split.train_x:
        jac = jacobian(lambda t, xi=xi: problem.logits(t, xi), problem.theta)
        p = torch.softmax(problem.logits(problem.theta, xi), dim=0)
        out.append(jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac)
    return out


@pytest.mark.parametrize("rows", [5, 400])  # wider than tall (Gram form), taller than wide
def test_ggn_solve_matches_an_explicit_solve(rows):
    u = torch.randn(rows, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = torch.randn(40, dtype=torch.float64)
    expected = torch.linalg.solve(u.T @ u + 0.3 * torch.eye(40, dtype=torch.float64), r)
    torch.testing.assert_close(bfo.ggn_solve(u, 0.3, r), expected)


def test_toggle_and_jensen_match_explicit_solves(problem):
    split, n = problem.split, len(problem.split.train_y)
    g_te, g_tr = (
        problem.grads(split.test_x, split.test_y),
        problem.grads(split.train_x, split.train_y),
    )
    ggns = per_example_ggns(problem)
    eye = torch.eye(len(problem.theta), dtype=torch.float64)
    h = sum(ggns) / n + (WD + LAM) * eye
    # toggle: example k's weight 0 and 2 (t = ∓1) with the others at 1, quadratic in its loss
    toggle = torch.stack(
        [
            (torch.linalg.solve(h - a / n, g) + torch.linalg.solve(h + a / n, g)) / 2
            for a, g in zip(ggns, g_tr, strict=True)
        ]
    )
    h_inv = torch.linalg.inv(h)
    shrunk = h - sum(a @ h_inv @ a for a in ggns) / n**2
    got = bfo.dense_corrections(problem, split, LAM, g_te)
    torch.testing.assert_close(got["toggle"], g_te @ toggle.T, rtol=1e-8, atol=1e-10)
    expected = g_te @ torch.linalg.solve(shrunk, g_tr.T)
    torch.testing.assert_close(got["jensen"], expected, rtol=1e-8, atol=1e-10)


def test_adam_run_reproduces_train_mlps():
    split = digits.digits_split()
    x, y = split.train_x[:30], split.train_y[:30]
    expected = digits.train_mlp(x, y, 3, width=4, steps=7, lr=0.05)
    model = digits.mlp_model(4)

    def objective(params):
        return digits.mlp_objective(model, params, x, y)

    got = bfo.adam_run(objective, digits.mlp_init(3, 4), steps=7, lr=0.05)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12)
