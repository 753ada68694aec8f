"""Projection specs: seeded matrices, serialisation, PCA init, validation, JL accuracy."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import logix_func as lf
from logix_func._projection import random_matrix_numpy, splitmix64


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False))


def test_spec_layout_and_rank_capping():
    spec = lf.logra(mlp(), rank=4, seed=3)
    first, last = spec.layers["0"], spec.layers["2"]
    assert (first.kind, first.weight, first.bias) == ("linear", "0.weight", "0.bias")
    assert (first.in_features, first.out_features, first.in_size) == (6, 5, 7)
    assert (first.rank_out, first.rank_in) == (4, 4)
    assert (last.bias, last.rank_out, last.rank_in) == (None, 3, 4)  # capped at out = 3
    p_out, p_in = spec.matrices("2", dtype=torch.float64)
    assert torch.equal(p_out, torch.eye(3, dtype=torch.float64))  # rank = size: identity
    assert p_in.shape == (4, 5)
    pair = lf.logra(mlp(), rank=(2, 5))
    assert (pair.layers["0"].rank_out, pair.layers["0"].rank_in) == (2, 5)
    full = lf.logra(mlp(), rank=None)
    assert (full.layers["0"].rank_out, full.layers["0"].rank_in) == (5, 7)


def test_splitmix64_matches_the_reference_algorithm():
    def reference(state):  # Vigna's splitmix64, one step from `state`
        mask = (1 << 64) - 1
        z = (state + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = 0x0123456789ABCDEF
    golden = 0x9E3779B97F4A7C15
    expected = [reference((key + i * golden) & ((1 << 64) - 1)) for i in range(5)]
    with np.errstate(over="ignore"):
        got = splitmix64(key, np.arange(5, dtype=np.uint64))
    assert [int(v) for v in got] == expected


def test_matrices_are_deterministic_per_seed_layer_and_side():
    spec = lf.logra(mlp(), rank=4, seed=11)
    a_out, a_in = spec.matrices("0", dtype=torch.float64)
    b_out, b_in = lf.logra(mlp(), rank=4, seed=11).matrices("0", dtype=torch.float64)
    assert torch.equal(a_out, b_out) and torch.equal(a_in, b_in)
    c_out, _ = lf.logra(mlp(), rank=4, seed=12).matrices("0", dtype=torch.float64)
    assert not torch.allclose(a_out, c_out)
    assert not torch.allclose(a_out[:, :4], a_in[:, :4])  # sides differ
    # entries depend on (seed, layer, side, position) only, not on the matrix's other sizes
    bigger = random_matrix_numpy(11, "0", "out", 4, 9, "gaussian")
    smaller = random_matrix_numpy(11, "0", "out", 4, 5, "gaussian")
    assert np.array_equal(bigger.reshape(-1)[:20], smaller.reshape(-1))
    # float32 is the float64 matrix rounded once
    f32_out, _ = spec.matrices("0", dtype=torch.float32)
    assert torch.equal(f32_out, a_out.float())


def test_rademacher_entries():
    p_out, p_in = lf.logra(mlp(), rank=4, distribution="rademacher").matrices("0")
    for p in (p_out, p_in):
        assert torch.equal(p.abs(), torch.full_like(p, 0.5))  # 1/sqrt(4)
        assert (p > 0).any() and (p < 0).any()


def test_gaussian_entries_have_the_right_moments():
    m = random_matrix_numpy(5, "layer", "in", 64, 2000, "gaussian") * math.sqrt(64)
    assert abs(m.mean()) < 0.01 and abs(m.std() - 1) < 0.01
    assert abs((m**4).mean() - 3) < 0.1  # Gaussian kurtosis


_CHILD = """
import json, sys, torch
from torch import nn
import logix_func as lf
spec = lf.ProjectionSpec.from_dict(json.loads(sys.argv[1]))
p_out, p_in = spec.matrices("0", dtype=torch.float32)
print(json.dumps([p_out.numpy().tobytes().hex(), p_in.numpy().tobytes().hex()]))
"""


def test_matrices_are_bit_identical_in_another_process():
    spec = lf.logra(mlp(), rank=4, seed=2**40 + 5, distribution="gaussian")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec.to_dict())],
        capture_output=True,
        text=True,
        check=True,
    )
    p_out, p_in = spec.matrices("0", dtype=torch.float32)
    assert json.loads(out.stdout) == [p_out.numpy().tobytes().hex(), p_in.numpy().tobytes().hex()]


def test_matrices_are_bit_identical_compiled_and_on_other_devices():
    spec = lf.logra(mlp(), rank=4, seed=9)
    eager = spec.matrices("0", dtype=torch.float32)
    compiled = torch.compile(lambda: spec.matrices("0", dtype=torch.float32), fullgraph=True)()
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
    meta = spec.matrices("0", device="meta", dtype=torch.float32)
    assert meta[0].device.type == "meta" and meta[0].shape == eager[0].shape
    if torch.cuda.is_available():
        cuda = spec.matrices("0", device="cuda", dtype=torch.float32)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(eager, cuda, strict=True))


def test_to_dict_from_dict_round_trip_through_json():
    spec = lf.logra(
        nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Flatten(), nn.Embedding(5, 2)), rank=(2, 3)
    )
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["layers"]["0"] == {
        "kind": "conv2d",
        "weight": "0.weight",
        "bias": "0.bias",
        "in": 27,
        "out": 4,
        "rank_in": 3,
        "rank_out": 2,
        "groups": 1,
    }
    assert data["layers"]["2"]["kind"] == "embedding"
    again = lf.ProjectionSpec.from_dict(data)
    assert again == spec
    with pytest.raises(ValueError, match="not a logix_func.ProjectionSpec"):
        lf.ProjectionSpec.from_dict({**data, "version": 99})


def planted(n, rank, samples, seed):
    """Samples concentrated on a random ``rank``-dimensional subspace, and its basis."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    scales = torch.linspace(3, 5, rank, dtype=torch.float64)
    z = torch.randn(samples, rank, generator=g, dtype=torch.float64) * scales
    x = z @ basis.T + 0.05 * torch.randn(samples, n, generator=g, dtype=torch.float64)
    return x, basis


def largest_principal_angle_sine(rows, basis):
    """sin of the largest principal angle between span(rows) and span(basis)."""
    q, _ = torch.linalg.qr(rows.T)
    residual = basis - q @ (q.T @ basis)
    return torch.linalg.matrix_norm(residual, ord=2).item()


def test_pca_init_recovers_a_planted_subspace_and_round_trips():
    model = nn.Sequential(nn.Linear(11, 9))  # in' = 12 with the bias column
    acts, basis_in = planted(12, 3, 2000, seed=0)
    grads, basis_out = planted(9, 2, 2000, seed=1)
    cov = {"0": {"A": acts.T @ acts / len(acts), "S": grads.T @ grads / len(grads)}}
    spec = lf.logra(model, rank=(2, 3), init="pca", covariances=cov)
    p_out, p_in = spec.matrices("0", dtype=torch.float64)
    assert largest_principal_angle_sine(p_in, basis_in) < 0.05
    assert largest_principal_angle_sine(p_out, basis_out) < 0.05
    torch.testing.assert_close(p_in @ p_in.T, torch.eye(3, dtype=torch.float64))
    # a random projection of the same rank does not find the subspace
    random_in = lf.logra(model, rank=(2, 3)).matrices("0", dtype=torch.float64)[1]
    assert largest_principal_angle_sine(random_in, basis_in) > 0.5
    again = lf.ProjectionSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert torch.equal(again.matrices("0", dtype=torch.float64)[1], p_in)


def kronecker_inner_product_errors(distribution, k_out, k_in, trials):
    """Errors of projected inner products of two fixed unit-norm matrices, one seed per trial."""
    g = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(2, 30, 40, generator=g, dtype=torch.float64)
    g2 = g2 + 0.5 * g1  # correlated pair: <g1, g2> well away from 0
    g1, g2 = g1 / g1.norm(), g2 / g2.norm()
    exact = (g1 * g2).sum()
    p_out = torch.from_numpy(
        np.stack(
            [random_matrix_numpy(s, "0", "out", k_out, 30, distribution) for s in range(trials)]
        )
    )
    p_in = torch.from_numpy(
        np.stack([random_matrix_numpy(s, "0", "in", k_in, 40, distribution) for s in range(trials)])
    )
    projected = ((p_out @ g1 @ p_in.mT) * (p_out @ g2 @ p_in.mT)).sum((1, 2))
    return projected - exact


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_projected_inner_products_obey_a_johnson_lindenstrauss_bound(distribution):
    """For unit-norm G1, G2, Var(<P_o G1 P_iᵀ, P_o G2 P_iᵀ>) ≤ 2 (1/k_o + 1/k_i + 2/(k_o k_i)).

    (Wishart moments of P_oᵀP_o and P_iᵀP_i, applied side by side.) The test checks the
    empirical mean squared error against that bound (with 50% statistical slack, several standard
    errors for 300 trials), unbiasedness, and that the errors shrink as k grows.
    """
    trials = 300
    small = kronecker_inner_product_errors(distribution, 4, 6, trials)
    large = kronecker_inner_product_errors(distribution, 16, 24, trials)
    for (k_out, k_in), errors in (((4, 6), small), ((16, 24), large)):
        bound = 2 * (1 / k_out + 1 / k_in + 2 / (k_out * k_in))
        assert errors.pow(2).mean() <= 1.5 * bound
        assert abs(errors.mean()) <= 4 * math.sqrt(bound / trials)  # unbiased
    assert large.pow(2).mean() < 0.5 * small.pow(2).mean()


def test_validation_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="layer '1' cannot be projected: it is a LayerNorm"):
        lf.logra(model, layers=["0", "1"])
    with pytest.raises(KeyError, match="no module named 'nope'"):
        lf.logra(model, layers=["nope"])
    with pytest.raises(TypeError, match="list of module names"):
        lf.logra(model, layers="0")
    for bad in (0, -3, (2,), (2, 0), 2.5, True):
        with pytest.raises(ValueError, match="rank must be"):
            lf.logra(model, rank=bad)
    with pytest.raises(ValueError, match="distribution must be"):
        lf.logra(model, distribution="uniform")
    with pytest.raises(ValueError, match="seed must be in"):
        lf.logra(model, seed=-1)
    with pytest.raises(ValueError, match="init must be"):
        lf.logra(model, init="svd")
    with pytest.raises(KeyError, match=r"covariances\['0'\]\['S'\]"):
        lf.logra(model, rank=2, init="pca", covariances={})
    with pytest.raises(ValueError, match="needs a rank"):
        lf.logra(model, rank=None, init="pca")
    with pytest.raises(ValueError, match="only used with init='pca'"):
        lf.logra(model, covariances={})
    with pytest.raises(ValueError, match="no projectable layer"):
        lf.logra(nn.Sequential(nn.ReLU()))
    data = lf.logra(model, rank=2).to_dict()
    data["layers"]["0"]["rank_in"] = 9
    with pytest.raises(ValueError, match=r"rank_in must be an int in \[1, 5\]"):
        lf.ProjectionSpec.from_dict(data)
    with pytest.raises(KeyError, match="no layer 'x'"):
        lf.logra(model).matrices("x")
    embedding = nn.Embedding(5, 3, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        lf.logra(nn.Sequential(embedding), layers=["0"])
