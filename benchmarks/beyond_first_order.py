"""Corrections beyond first-order influence on a digits-MLP LDS ground truth, per member and for
the ensemble of members (mean of scores).

    python -m benchmarks.beyond_first_order [--data tests/data/lds_mlp.npz] [--members 3]
        [--methods center toggle jensen halves unrolled] [--damping 1e-3] [--samples 8]

The ground truth retrains on random halves: every example's weight in the mean loss moves from
1 to 0 or 2 at once (``w ∈ {0, 2}^N``), far from the infinitesimal change first-order influence
linearises. With the all-layer GGN ``G = UᵀU + wd I`` (`dense_curvature.Problem.ggn_rows`,
``H = G + λI``) of each stored full-data model θ*, scores ``g_test H⁻¹ g̃_n`` of

- ``center``: first-order influence, ``g̃_n = g_n`` (the reference);
- ``toggle``: example n toggled from weight 0 to 2 with the others at 1, to second order in its
  own curvature: ``g̃_n = J_nᵀ (I − M_n²)⁻¹ e_n`` with ``M_n = Λ_n J_n H⁻¹ J_nᵀ / N`` (``J_n`` the
  logits' Jacobian, ``Λ_n`` the softmax Hessian, ``e_n = p_n − y_n``);
- ``jensen``: the others at random weights, to second order: ``E[(H + E)⁻¹] ≈ (H − C)⁻¹`` with
  ``C = Σ_n U_nᵀ (U_n H⁻¹ U_nᵀ) U_n``, the variance of ``E = Σ_n (w_n − 1) U_nᵀ U_n``;
- ``halves``: the mean over ``--samples`` random halves ``S`` (antithetic: each half, then its
  complement) of the first-order scores at the Newton half-model
  ``θ_S = θ* − H⁻¹ ∇O_w(θ*)`` (``O_w = (1/N) Σ w_n ℓ_n + (wd / 2) ‖θ‖²``), with the GGN and the
  gradients of ``θ_S`` — the marginal effects averaged over the cube the ground truth samples,
  without retraining;
- ``unrolled``: the exact derivative ``∂ℓ_test(θ_T(w)) / ∂w_n`` at ``w = 1`` through the
  member's training run (`digits.train_mlps`: full-batch Adam, cosine schedule, from the
  member's seed), by reverse mode through every step; the stored weights are reproduced first
  (the largest difference is printed).

``toggle`` and ``jensen`` build ``H`` densely (``D ≤ 4096``); ``unrolled`` costs about a minute
per member of the reference 64-32-10 MLP and is for models of that size. Wall time per member
is printed.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import functional_call, grad, jacrev, vmap

from benchmarks.dense_curvature import Problem, ggn_scores
from benchmarks.lds_data import load_ground_truth
from logix_func.demo import digits

METHODS = ("center", "toggle", "jensen", "halves", "unrolled")
DENSE_MAX = 4096


def ggn_solve(u: Float[Tensor, "r D"], mu: float, r: Float[Tensor, " D"]) -> Tensor:
    """``(UᵀU + μI)⁻¹ r``, through the ``[r, r]`` Gram matrix when ``U`` is wider than tall."""
    if u.shape[1] > u.shape[0]:
        gram = u @ u.T
        gram.diagonal().add_(mu)
        return (
            r - u.T @ torch.cholesky_solve((u @ r)[:, None], torch.linalg.cholesky(gram))[:, 0]
        ) / mu
    dense = u.T @ u
    dense.diagonal().add_(mu)
    return torch.linalg.solve(dense, r)


def jacobians(prob: Problem, x: Tensor) -> tuple[Tensor, Tensor]:
    """``J [N, C, D]`` of the logits and the probabilities ``p [N, C]`` at ``prob.theta``."""
    jac = torch.cat(
        [vmap(jacrev(prob.logits), in_dims=(None, 0))(prob.theta, c) for c in x.split(100)]
    )
    return jac, torch.softmax(vmap(prob.logits, in_dims=(None, 0))(prob.theta, x), dim=1)


def dense_corrections(prob: Problem, split, lam: float, g_te: Tensor) -> dict[str, Tensor]:
    """``toggle`` and ``jensen`` scores of one member (the module docstring)."""
    x, y = split.train_x, split.train_y
    n, d = len(y), len(prob.theta)
    if d > DENSE_MAX:
        raise ValueError(f"toggle and jensen build H densely: D = {d} > {DENSE_MAX}")
    jac, prob_out = jacobians(prob, x)
    softmax_hess = torch.diag_embed(prob_out) - prob_out[:, :, None] * prob_out[:, None, :]
    e = prob_out - torch.nn.functional.one_hot(y, prob_out.shape[1]).to(prob_out)
    u = prob.ggn_rows()
    h = u.T @ u
    h.diagonal().add_(prob.wd + lam)
    factor = torch.linalg.cholesky(h)
    solved_te = torch.cholesky_solve(g_te.T, factor)  # H⁻¹ g_testᵀ [D, Q]
    h_jac = torch.cholesky_solve(jac.flatten(0, 1).T, factor).T.reshape(jac.shape)
    m = softmax_hess @ torch.einsum("ncd,nkd->nck", jac, h_jac) / n
    eye = torch.eye(m.shape[1], dtype=m.dtype)
    e_toggled = torch.linalg.solve(eye - m @ m, e[:, :, None])[:, :, 0]
    toggled = solved_te.T @ torch.einsum("ncd,nc->nd", jac, e_toggled).T
    rows = u.view(n, -1, d)
    leverage = torch.einsum(
        "ncd,nkd->nck", rows, torch.cholesky_solve(u.T, factor).T.reshape(rows.shape)
    )
    shrunk = h - torch.einsum("ncd,nck,nke->de", rows, leverage, rows)
    g_tr = torch.einsum("ncd,nc->nd", jac, e)
    jensen = g_te @ torch.linalg.solve(shrunk, g_tr.T)
    return {"toggle": toggled, "jensen": jensen}


def first_order(prob: Problem, split, lam: float) -> Float[Tensor, "Q N"]:
    """``center``: ``g_test (G + λI)⁻¹ g_trainᵀ`` at ``prob.theta``."""
    g_te, g_tr = prob.grads(split.test_x, split.test_y), prob.grads(split.train_x, split.train_y)
    return ggn_scores(prob.ggn_rows(), prob.wd, g_te, g_tr, [lam])[lam]


def half_models(prob: Problem, split, lam: float, samples: int, seed: int) -> Tensor:
    """``halves``: mean scores over Newton half-models (the module docstring)."""
    x, y = split.train_x, split.train_y
    n, mu = len(y), prob.wd + lam
    u, g_tr = prob.ggn_rows(), prob.grads(x, y)
    rng = np.random.default_rng(seed)
    total, half = 0.0, np.zeros(n, dtype=bool)
    for s in range(samples):
        if s % 2 == 0:
            half = np.zeros(n, dtype=bool)
            half[rng.choice(n, n // 2, replace=False)] = True
        else:
            half = ~half
        w = torch.from_numpy(2.0 * half).to(g_tr)
        gradient = (w[:, None] * g_tr).sum(0) / n + prob.wd * prob.theta
        moved = Problem(
            prob.model, prob.unflat(prob.theta - ggn_solve(u, mu, gradient)), split, prob.wd
        )
        total = total + first_order(moved, split, lam)
    return total / samples


def adam_run(objective, init: dict[str, Tensor], steps: int, lr: float) -> dict[str, Tensor]:
    """``steps`` steps of full-batch Adam on ``objective(params)`` from ``init``, ``lr``
    cosine-decayed to 0 — `digits.train_mlps`'s optimiser (`torch.optim.Adam` with its defaults
    and `CosineAnnealingLR`) written as a differentiable function of its inputs."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = dict(init)
    first = {name: torch.zeros_like(p) for name, p in params.items()}
    second = {name: torch.zeros_like(p) for name, p in params.items()}
    for t in range(steps):
        g = grad(objective)(params)
        rate = lr * (1 + math.cos(math.pi * t / steps)) / 2 / (1 - b1 ** (t + 1))
        first = {name: b1 * first[name] + (1 - b1) * g[name] for name in params}
        second = {name: b2 * second[name] + (1 - b2) * g[name] ** 2 for name in params}
        params = {
            name: params[name]
            - rate * first[name] / (second[name].sqrt() / math.sqrt(1 - b2 ** (t + 1)) + eps)
            for name in params
        }
    return params


def unrolled(gt, data, k: int, split) -> Tensor:
    """``unrolled``: ``−∂ℓ_test(θ_T(w)) / ∂w`` at ``w = 1`` for member ``k`` (seed ``k``) [Q, N]."""
    x, y = split.train_x, split.train_y
    width = int(data["width"])
    depth = int(data["depth"]) if "depth" in data.files else 1
    steps, lr, wd = int(data["steps"]), float(data["lr"]), float(data["weight_decay"])
    init = digits.mlp_init(k, width, x.dtype, depth=depth)
    model = gt.model.to(x.dtype)

    def objective(params, w):
        losses = torch.nn.functional.cross_entropy(
            functional_call(model, params, (x,)), y, reduction="none"
        )
        return (w * losses).sum() / len(y) + 0.5 * wd * sum((p**2).sum() for p in params.values())

    def train(w):
        return adam_run(lambda params: objective(params, w), init, steps, lr)

    ones = torch.ones(len(y), dtype=x.dtype)
    with torch.no_grad():
        trained = train(ones)
    gap = max(float((trained[n] - gt.params[k][n].to(x.dtype)).abs().max()) for n in trained)
    print(f"  member {k}: retrained here, largest difference to the stored weights {gap:.1e}")

    def test_losses(w):
        logits = functional_call(model, train(w), (split.test_x,))
        return torch.nn.functional.cross_entropy(logits, split.test_y, reduction="none")

    return -jacrev(test_losses, chunk_size=50)(ones)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tests/data/lds_mlp.npz")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--damping", type=float, default=1e-3, help="λ added to the GGN")
    parser.add_argument("--samples", type=int, default=8, help="half-models per member")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gt = load_ground_truth(args.data, members=args.members)
    data = np.load(args.data)
    split = gt.split
    split = type(split)(*(t.double() if t.is_floating_point() else t for t in vars(split).values()))
    print(f"ground truth {args.data}: {gt.describe}; GGN + λ = {args.damping:g}", flush=True)
    totals: dict[str, Tensor] = {}
    for k, params in enumerate(gt.params):
        clock = time.perf_counter()
        prob = Problem(gt.model, params, split, digits.MLP_WEIGHT_DECAY)
        scores = {}
        if "center" in args.methods:
            scores["center"] = first_order(prob, split, args.damping)
        if {"toggle", "jensen"} & set(args.methods):
            g_te = prob.grads(split.test_x, split.test_y)
            dense = dense_corrections(prob, split, args.damping, g_te)
            scores |= {m: s for m, s in dense.items() if m in args.methods}
        if "halves" in args.methods:
            scores["halves"] = half_models(prob, split, args.damping, args.samples, seed=1000 + k)
        if "unrolled" in args.methods:
            scores["unrolled"] = unrolled(gt, data, k, split)
        for m, s in scores.items():
            totals[m] = totals.get(m, 0) + s
        cells = ", ".join(
            f"{m} {gt.lds(s):.3f} (mean of {k + 1}: {gt.lds(totals[m] / (k + 1)):.3f})"
            for m, s in scores.items()
        )
        print(f"member {k}: {cells}  [{time.perf_counter() - clock:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
