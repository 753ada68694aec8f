"""token_heatmap draws one coloured cell per token, its colour's sign following the score."""

import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.patches import Rectangle  # noqa: E402

from logix_func.plots import token_heatmap  # noqa: E402

TOKENS = ["the", "small", "cat", "eats", "fish", ".", "a", "very", "long", "sequence"]
SCORES = torch.tensor([0.5, -2.0, 3.0, 0.0, 1.0, -0.25, -3.0, 0.1, 2.0, -1.0])


def cells(fig):
    return [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]


def test_one_cell_per_token_coloured_by_sign(tmp_path):
    path = tmp_path / "tokens.png"
    fig = token_heatmap(TOKENS, SCORES, str(path), title="query 0", line_chars=20)
    drawn = cells(fig)
    assert len(drawn) == len(TOKENS)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == TOKENS
    for score, cell in zip(SCORES.tolist(), drawn, strict=True):
        r, _, b, _ = cell.get_facecolor()
        # RdBu: red below 0, blue above, white at 0; the deeper, the larger |score|
        if score > 0:
            assert b > r, (score, r, b)
        elif score < 0:
            assert r > b, (score, r, b)
        else:
            assert abs(r - b) < 0.05, (score, r, b)
    strongest = drawn[int(SCORES.abs().argmax())].get_facecolor()
    weakest = drawn[int(SCORES.abs().argmin())].get_facecolor()
    assert sum(strongest[:3]) < sum(weakest[:3])  # darker
    rows = {cell.get_y() for cell in drawn}
    assert len(rows) > 1  # wrapped at 20 characters
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_centred_at_zero_when_all_scores_share_a_sign():
    fig = token_heatmap(["a", "b"], [1.0, 2.0])
    (low, _, b_low, _), (high, _, b_high, _) = (c.get_facecolor() for c in cells(fig))
    assert b_low > low and b_high > high  # both blue, not one of them red


def test_rejects_a_length_mismatch_no_tokens_and_non_finite_scores():
    with pytest.raises(ValueError, match="3 tokens but 2 scores"):
        token_heatmap(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ValueError, match="no tokens"):
        token_heatmap([], torch.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        token_heatmap(["a"], [float("nan")])
