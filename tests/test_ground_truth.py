"""The committed ground truth (tests/data) is consistent, reproducible and usable.

``loo_logreg.npz`` and ``lds_mlp.npz`` come from ``benchmarks/ground_truth``; see
docs/validation.md. Influence references here are built independently of the package: a dense
Hessian from ``torch.autograd.functional.hessian``, per-example gradients from a loop of
``torch.autograd.grad``, a GGN from per-example logit Jacobians.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch.func import functional_call, jacrev, vmap

from logix_func import lds, loo_correlation
from logix_func.demo import digits

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split():
    return digits.digits_split()


@pytest.fixture(scope="module")
def loo():
    return dict(np.load(DATA / "loo_logreg.npz"))


@pytest.fixture(scope="module")
def lds_data():
    return dict(np.load(DATA / "lds_mlp.npz"))


def stored_logreg(loo):
    return {"weight": torch.from_numpy(loo["weight"]), "bias": torch.from_numpy(loo["bias"])}


def stored_mlp(data):
    return {k.removeprefix("param/"): torch.from_numpy(v) for k, v in data.items() if "/" in k}


def flat_grad(fn, params):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    return torch.cat([g.flatten() for g in torch.autograd.grad(fn(params), list(params.values()))])


# ---- leave-one-out on the logistic regression -------------------------------------------------


def test_loo_file_is_consistent(split, loo):
    n, q_all = len(split.train_y), len(split.test_y)
    assert (float(loo["l2"]), int(loo["n_train"])) == (digits.LOGREG_L2, n)
    assert int(loo["split_seed"]) == digits.SPLIT_SEED
    removed, test = loo["removed"], loo["test"]
    assert len(removed) >= 60 and len(test) >= 10
    assert len(set(removed)) == len(removed) and removed.min() >= 0 and removed.max() < n
    assert len(set(test)) == len(test) and test.min() >= 0 and test.max() < q_all
    assert loo["delta_loss"].shape == loo["delta_loss_mean"].shape == (len(test), len(removed))
    assert np.isfinite(loo["delta_loss"]).all() and loo["test_loss"].shape == (len(test),)


def test_logreg_recipe_reproduces_the_stored_model(split, loo):
    params = digits.train_logreg(split.train_x, split.train_y, float(loo["l2"]))
    stored = stored_logreg(loo)
    for k in params:
        torch.testing.assert_close(params[k], stored[k], rtol=0, atol=1e-9)
    grad = flat_grad(lambda p: digits.logreg_objective(p, split.train_x, split.train_y), stored)
    assert grad.abs().max() < 1e-10  # the stored weights are the optimum
    losses = digits.per_example_loss(digits.logreg_model(), stored, split.test_x, split.test_y)
    np.testing.assert_allclose(losses[loo["test"]].numpy(), loo["test_loss"], rtol=1e-12)


def test_loo_retraining_reproduces_stored_deltas(split, loo):
    stored = stored_logreg(loo)
    n, l2 = len(split.train_y), float(loo["l2"])
    test_x, test_y = split.test_x[loo["test"]], split.test_y[loo["test"]]
    model = digits.logreg_model()
    biggest = int(np.abs(loo["delta_loss"]).max(axis=0).argmax())
    for m in (biggest, len(loo["removed"]) // 2):
        i = int(loo["removed"][m])
        keep = torch.arange(n) != i
        params = digits.train_logreg(
            split.train_x[keep], split.train_y[keep], l2 * n / (n - 1), stored
        )

        # Stationary for the full objective with example i's weight set to zero.
        def weight_zero(p, i=i):
            logits = split.train_x @ p["weight"].T + p["bias"]
            losses = torch.nn.functional.cross_entropy(logits, split.train_y, reduction="none")
            return (losses.sum() - losses[i]) / n + 0.5 * l2 * sum(
                v.square().sum() for v in p.values()
            )

        assert flat_grad(weight_zero, params).abs().max() < 1e-10
        delta = digits.per_example_loss(model, params, test_x, test_y).numpy() - loo["test_loss"]
        np.testing.assert_allclose(delta, loo["delta_loss"][:, m], rtol=1e-6, atol=1e-11)


def test_exact_hessian_influence_matches_leave_one_out(split, loo):
    stored = stored_logreg(loo)
    shapes = {k: v.shape for k, v in stored.items()}
    flat = torch.cat([v.flatten() for v in stored.values()])

    def unflat(theta):
        w, b = theta.split([shapes["weight"].numel(), shapes["bias"].numel()])
        return {"weight": w.view(shapes["weight"]), "bias": b}

    def objective(theta):
        return digits.logreg_objective(
            unflat(theta), split.train_x, split.train_y, float(loo["l2"])
        )

    hessian = torch.autograd.functional.hessian(objective, flat)  # [650, 650]
    assert torch.linalg.eigvalsh(hessian)[0] > 0

    def example_grads(x, y):
        rows = []
        for xi, yi in zip(x, y, strict=True):
            theta = flat.clone().requires_grad_(True)
            p = unflat(theta)
            loss = torch.nn.functional.cross_entropy(
                (xi @ p["weight"].T + p["bias"])[None], yi[None]
            )
            rows.append(torch.autograd.grad(loss, theta)[0])
        return torch.stack(rows)

    g_train = example_grads(split.train_x[loo["removed"]], split.train_y[loo["removed"]])
    g_test = example_grads(split.test_x[loo["test"]], split.test_y[loo["test"]])
    scores = g_test @ torch.linalg.solve(hessian, g_train.T)  # [Q, M], positive = helps
    predicted = scores / len(split.train_y)  # predicted rise of the test loss on removal
    r, rho = loo_correlation(predicted, loo["delta_loss"])
    assert r == pytest.approx(stats.pearsonr(predicted.flatten(), loo["delta_loss"].ravel())[0])
    assert r >= 0.95 and rho >= 0.9
    # The same λ with a mean over N - 1 shifts each test point's changes by a common offset.
    assert loo_correlation(predicted, loo["delta_loss_mean"])[0] >= 0.95


# ---- LDS on the MLP ---------------------------------------------------------------------------


def test_lds_file_is_consistent(split, lds_data):
    masks, outputs, per_seed = lds_data["masks"], lds_data["outputs"], lds_data["outputs_per_seed"]
    n, q = len(split.train_y), len(split.test_y)
    assert masks.dtype == bool and masks.shape[1] == n and len(masks) >= 50
    assert (masks.sum(axis=1) == n // 2).all() and len(np.unique(masks, axis=0)) == len(masks)
    assert outputs.shape == (len(masks), q) and per_seed.shape == (len(masks), 3, q)
    np.testing.assert_allclose(outputs, per_seed.astype(np.float64).mean(axis=1), rtol=1e-6)
    assert int(lds_data["width"]) == digits.MLP_WIDTH and int(lds_data["steps"]) == digits.MLP_STEPS
    assert float(lds_data["weight_decay"]) == digits.MLP_WEIGHT_DECAY
    assert float(lds_data["lr"]) == digits.MLP_LR


def test_mlp_recipe_reproduces_the_stored_model(split, lds_data):
    params = digits.train_mlp(split.train_x, split.train_y, seed=0)
    stored = stored_mlp(lds_data)
    assert params.keys() == stored.keys()
    for k in params:
        torch.testing.assert_close(params[k], stored[k], rtol=0, atol=1e-8)
    losses = digits.per_example_loss(digits.mlp_model(), stored, split.test_x, split.test_y)
    np.testing.assert_allclose(losses.numpy(), lds_data["test_loss"], rtol=1e-10)


def test_one_subset_retraining_reproduces_stored_outputs(split, lds_data):
    mask = torch.from_numpy(lds_data["masks"][3])
    seed = int(lds_data["seeds"][1])
    params = digits.train_mlp(split.train_x[mask], split.train_y[mask], seed=seed)
    losses = digits.per_example_loss(digits.mlp_model(), params, split.test_x, split.test_y)
    np.testing.assert_allclose(losses.numpy(), lds_data["outputs_per_seed"][3, 1], rtol=1e-4)


def test_exact_ggn_influence_reaches_a_high_lds(split, lds_data):
    stored = stored_mlp(lds_data)
    model = digits.mlp_model()
    names = list(stored)
    sizes = [stored[k].numel() for k in names]
    flat = torch.cat([stored[k].flatten() for k in names])

    def logits(theta, x):
        chunks = theta.split(sizes)
        params = {k: c.view(stored[k].shape) for k, c in zip(names, chunks, strict=True)}
        return functional_call(model, params, (x,))

    # GGN of the objective: (1/N) Σ_n J_nᵀ (diag p_n - p_n p_nᵀ) J_n + weight_decay · I.
    n = len(split.train_y)
    ggn = digits.MLP_WEIGHT_DECAY * torch.eye(len(flat), dtype=flat.dtype)
    for x in split.train_x.split(325):
        jac = vmap(jacrev(logits), in_dims=(None, 0))(flat, x)  # [b, 10, P]
        prob = torch.softmax(logits(flat, x), dim=1)
        centred = jac - torch.einsum("bc,bcp->bp", prob, jac)[:, None]
        rows = (prob.sqrt()[..., None] * centred).flatten(0, 1)  # [b * 10, P]
        ggn += rows.T @ rows / n

    def grads(x, y):  # per-example cross-entropy gradients, [b, P]
        jac = vmap(jacrev(logits), in_dims=(None, 0))(flat, x)
        residual = torch.softmax(logits(flat, x), dim=1)
        residual = residual - torch.nn.functional.one_hot(y, 10).to(residual.dtype)
        return torch.einsum("bc,bcp->bp", residual, jac)

    g_train = torch.cat(
        [
            grads(x, y)
            for x, y in zip(split.train_x.split(325), split.train_y.split(325), strict=True)
        ]
    )
    g_test = grads(split.test_x[:100], split.test_y[:100])
    scores = g_test @ torch.linalg.solve(ggn + 1e-3 * torch.eye(len(flat)), g_train.T)
    masks, outputs = lds_data["masks"], lds_data["outputs"][:, :100]
    influence_lds, per_query = lds(scores, masks, outputs, measurement="loss")
    dot_lds, _ = lds(g_test @ g_train.T, masks, outputs)
    random_lds, _ = lds(torch.randn_like(scores), masks, outputs)
    assert influence_lds >= 0.7 and (per_query > 0).float().mean() > 0.95
    assert dot_lds < influence_lds - 0.2 and abs(random_lds) < 0.1


def test_train_mlps_rejects_bad_masks(split):
    with pytest.raises(ValueError, match="masks must be Bool"):
        digits.train_mlps(split.train_x, split.train_y, [0], torch.ones(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        digits.train_mlps(
            split.train_x, split.train_y, [0, 1], torch.eye(2, 1300, dtype=torch.bool) & False
        )


# ---- the second ground truth: never tuned on (benchmarks/ground_truth/*_constant, *_deep_*) --


@pytest.fixture(scope="module")
def constant_loo():
    return dict(np.load(DATA / "loo_logreg_constant.npz"))


@pytest.fixture(scope="module")
def deep():
    return dict(np.load(DATA / "lds_deep_mlp.npz"))


def test_constant_logreg_recipe_reproduces_the_stored_model_and_a_removal(constant_loo):
    seed = int(constant_loo["split_seed"])
    assert seed != digits.SPLIT_SEED
    split = digits.digits_split(seed=seed)
    x, y = digits.with_constant(split.train_x), split.train_y
    n, l2 = len(y), float(constant_loo["l2"])
    assert l2 == pytest.approx(1.0 / n) and int(constant_loo["n_train"]) == n
    params = digits.train_logreg(x, y, l2, bias=False)
    assert params.keys() == {"weight"} and params["weight"].shape == (10, 65)
    stored = {"weight": torch.from_numpy(constant_loo["weight"])}
    torch.testing.assert_close(params["weight"], stored["weight"], rtol=0, atol=1e-9)
    # Stationary for Σ_n CE_n + (α/2)‖W‖² with α = 1, the "summed loss" form of the objective.
    summed = flat_grad(
        lambda p: (
            torch.nn.functional.cross_entropy(x @ p["weight"].T, y, reduction="sum")
            + 0.5 * p["weight"].square().sum()
        ),
        stored,
    )
    assert summed.abs().max() < 1e-8
    m = int(np.abs(constant_loo["delta_loss"]).max(axis=0).argmax())
    keep = torch.arange(n) != int(constant_loo["removed"][m])
    retrained = digits.train_logreg(x[keep], y[keep], l2 * n / (n - 1), stored)
    test = constant_loo["test"]
    model = digits.logreg_model(inputs=65, bias=False)
    test_x = digits.with_constant(split.test_x[test])
    before = digits.per_example_loss(model, stored, test_x, split.test_y[test])
    after = digits.per_example_loss(model, retrained, test_x, split.test_y[test])
    np.testing.assert_allclose(
        (after - before).numpy(), constant_loo["delta_loss"][:, m], rtol=1e-6, atol=1e-11
    )


def test_deep_lds_file_is_consistent(deep):
    masks, per_seed = deep["masks"], deep["loss_per_seed"]
    assert int(deep["split_seed"]) != digits.SPLIT_SEED
    split = digits.digits_split(seed=int(deep["split_seed"]))
    n, q = len(split.train_y), len(split.test_y)
    assert masks.shape == (256, n) and (masks.sum(axis=1) == n // 2).all()
    assert len(np.unique(masks, axis=0)) == len(masks)
    assert per_seed.shape == deep["margin_per_seed"].shape == (256, 5, q)
    assert np.isfinite(per_seed).all() and (per_seed >= 0).all()
    # loss = softplus(-margin) for cross-entropy: the two stored outputs agree.
    margin = deep["margin_per_seed"].astype(np.float64)
    np.testing.assert_allclose(per_seed, np.logaddexp(0, -margin), rtol=1e-3, atol=1e-6)
    assert (int(deep["width"]), int(deep["depth"])) == (128, 2)
    assert len([k for k in deep if k.startswith("param")]) == 5 * 6


def test_deep_mlp_recipe_reproduces_the_stored_model_and_a_subset(deep):
    split = digits.digits_split(torch.float32, seed=int(deep["split_seed"]))
    model = digits.mlp_model(128, torch.float32, depth=2)
    params = digits.train_mlp(split.train_x, split.train_y, seed=2, width=128, depth=2)
    for k, v in params.items():
        np.testing.assert_allclose(v.numpy(), deep[f"param2/{k}"], rtol=0, atol=1e-5)
    mask = torch.from_numpy(deep["masks"][5])
    sub = digits.train_mlp(split.train_x[mask], split.train_y[mask], seed=3, width=128, depth=2)
    losses = digits.per_example_loss(model, sub, split.test_x, split.test_y).numpy()
    np.testing.assert_allclose(losses, deep["loss_per_seed"][5, 3], rtol=1e-4, atol=1e-6)
