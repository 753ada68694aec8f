"""Correlation metrics, leave-one-out agreement and LDS against scipy and explicit loops."""

import numpy as np
import pytest
import torch
from scipy import stats

from logix_func import lds, loo_correlation, pearson, spearman
from logix_func.metrics import rankdata


def test_rankdata_matches_scipy_with_ties():
    x = torch.randint(0, 6, (4, 30)).double()
    expected = stats.rankdata(x.numpy(), axis=-1)
    np.testing.assert_array_equal(rankdata(x).numpy(), expected)


@pytest.mark.parametrize("ties", [False, True])
def test_pearson_and_spearman_match_scipy(ties):
    a = torch.randn(5, 40, dtype=torch.float64)
    b = 0.5 * a + torch.randn(5, 40, dtype=torch.float64)
    if ties:
        a, b = a.round(), b.round()
    got_p, got_s = pearson(a, b), spearman(a.numpy(), b.numpy())
    for row in range(5):
        assert got_p[row].item() == pytest.approx(stats.pearsonr(a[row], b[row])[0], abs=1e-12)
        assert got_s[row].item() == pytest.approx(stats.spearmanr(a[row], b[row])[0], abs=1e-12)


def test_constant_input_gives_nan_and_bad_input_raises():
    assert torch.isnan(pearson(torch.ones(10), torch.arange(10.0)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        pearson(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="equal shapes"):
        spearman(torch.ones(3), torch.ones(4))


def test_loo_correlation_flattens_all_pairs():
    predicted = torch.randn(6, 20, dtype=torch.float64)
    actual = predicted + 0.3 * torch.randn(6, 20, dtype=torch.float64) ** 3
    r, rho = loo_correlation(predicted, actual)
    assert r == pytest.approx(stats.pearsonr(predicted.flatten(), actual.flatten())[0], abs=1e-12)
    assert rho == pytest.approx(
        stats.spearmanr(predicted.flatten(), actual.flatten())[0], abs=1e-12
    )
    with pytest.raises(ValueError, match="differ in shape"):
        loo_correlation(predicted, actual.T)


def test_lds_matches_an_explicit_loop_and_follows_the_sign_convention():
    n, q, s = 50, 7, 30
    scores = torch.randn(q, n, dtype=torch.float64)
    subsets = torch.rand(s, n) < 0.5
    # A query loss falls by the scores of the examples trained on, plus noise.
    losses = -(subsets.double() @ scores.T) + 2.0 * torch.randn(s, q, dtype=torch.float64)
    mean, per_query = lds(scores, subsets, losses)
    expected = [
        stats.spearmanr(-(subsets.double() @ scores[j]).numpy(), losses[:, j].numpy())[0]
        for j in range(q)
    ]
    np.testing.assert_allclose(per_query.numpy(), expected, atol=1e-12)
    assert mean == pytest.approx(np.mean(expected), abs=1e-12)
    assert mean > 0.5
    gain_mean, gain_per_query = lds(scores, subsets.numpy(), -losses.numpy(), measurement="gain")
    assert gain_mean == pytest.approx(mean, abs=1e-12)
    assert lds(scores, subsets, losses, measurement="gain")[0] == pytest.approx(-mean, abs=1e-12)


def test_lds_skips_constant_queries_and_rejects_bad_input():
    scores = torch.randn(3, 20, dtype=torch.float64)
    subsets = torch.rand(10, 20) < 0.5
    outputs = torch.randn(10, 3, dtype=torch.float64)
    outputs[:, 1] = 1.0
    mean, per_query = lds(scores, subsets, outputs)
    assert torch.isnan(per_query[1]) and not torch.isnan(per_query[[0, 2]]).any()
    assert mean == pytest.approx(per_query[[0, 2]].mean().item())
    with pytest.raises(ValueError, match="boolean mask"):
        lds(scores, subsets.long(), outputs)
    with pytest.raises(ValueError, match="shapes disagree"):
        lds(scores, subsets, outputs.T)
    with pytest.raises(ValueError, match="measurement"):
        lds(scores, subsets, outputs, measurement="margin")
    with pytest.raises(ValueError, match="undefined"):
        lds(scores, subsets, torch.ones(10, 3))
