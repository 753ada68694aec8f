"""The dense-curvature benchmark's pieces against explicit matrices on a tiny MLP.

``benchmarks/dense_curvature.py`` builds the GGN from per-example Jacobians, the Hessian from
Hessian-vector products, and solves through a Gram form or a block-tridiagonal inverse; each is
checked here against torch.autograd on a loop or an explicit inverse.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from benchmarks import dense_curvature as dc
from logix_func.demo import digits

WD = 1e-3


@pytest.fixture(scope="module")
def problem():
    split = digits.digits_split()
    data = SimpleNamespace(train_x=split.train_x[:12], train_y=split.train_y[:12])
    model = digits.mlp_model(3, depth=2)  # D = 195 + 12 + 40 = 247, three layers
    params = digits.mlp_init(1, 3, depth=2)
    return dc.Problem(model, params, data, WD)


def test_ggn_rows_give_the_ggn_of_a_jacobian_loop(problem):
    x = problem.split.train_x
    ggn = torch.zeros(len(problem.theta), len(problem.theta), dtype=torch.float64)
    for xi in x:
        jac = jacobian(lambda t, xi=xi: problem.logits(t, xi), problem.theta)  # [C, D]
        p = torch.softmax(problem.logits(problem.theta, xi), dim=0)
        ggn += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / len(x)
    u = problem.ggn_rows(chunk=5)
    torch.testing.assert_close(u.T @ u, ggn, rtol=1e-10, atol=1e-12)


def test_hessian_matches_autograd(problem):
    split, unflat = problem.split, problem.unflat

    def objective(theta):
        return digits.mlp_objective(problem.model, unflat(theta), split.train_x, split.train_y, WD)

    expected = hessian(objective, problem.theta)
    torch.testing.assert_close(problem.hessian(chunk=50), expected, rtol=1e-9, atol=1e-12)


def test_gram_and_dense_scores_match_an_explicit_solve(problem):
    u = problem.ggn_rows()  # [120, 247]: wider than tall, the Gram form
    g = problem.grads(problem.split.train_x, problem.split.train_y)
    eye = torch.eye(u.shape[1], dtype=torch.float64)
    gram = dc.ggn_scores(u, WD, g[:4], g, [0.0, 1e-2])
    dense = dc.dense_scores(u.T @ u + WD * eye, g[:4], g, [0.0, 1e-2])
    for lam in (0.0, 1e-2):
        expected = g[:4] @ torch.linalg.solve(u.T @ u + (WD + lam) * eye, g.T)
        torch.testing.assert_close(gram[lam], expected, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(dense[lam], expected, rtol=1e-8, atol=1e-10)
    assert dc.dense_scores(-eye, g[:4], g, [0.5]) == {0.5: None}  # not PD: no scores


def test_tridiagonal_inverse_keeps_the_tridiagonal_blocks(problem):
    """The chain approximation Ĝ agrees with G on the diagonal and neighbouring blocks; with
    the first two layers merged it is G itself (two blocks: nothing to approximate)."""
    u = problem.ggn_rows()
    d = u.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    full = u.T @ u + WD * eye
    approx = torch.linalg.inv(
        dc.tridiagonal_scores(
            dc.neighbour_grams(u, problem.layers), problem.layers, WD, eye, eye, [0.0]
        )[0.0]
    )
    (a0, b0), (a1, b1), (a2, b2) = problem.layers
    for rows, cols in [((a0, b0), (a0, b1)), ((a1, b1), (a0, b2)), ((a2, b2), (a1, b2))]:
        r, c = slice(*rows), slice(*cols)
        torch.testing.assert_close(approx[r, c], full[r, c], rtol=1e-7, atol=1e-9)
    assert (approx[a0:b0, a2:b2] - full[a0:b0, a2:b2]).abs().max() > 1e-6  # not the full G
    two = [(a0, b1), (a2, b2)]
    exact = dc.tridiagonal_scores(dc.neighbour_grams(u, two), two, WD, eye, eye, [0.0])[0.0]
    torch.testing.assert_close(exact, torch.linalg.inv(full), rtol=1e-7, atol=1e-7)
