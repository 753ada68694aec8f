"""token_heatmap draws one coloured cell per token, its colour's sign following the score."""

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# figures of attributions: content checked against the inputs, rendered to PNG

from matplotlib.figure import Figure  # noqa: E402

from logix_func._influence import TopK  # noqa: E402
from logix_func.plots import (  # noqa: E402
    influence_grid,
    proponent_table,
    score_heatmap,
    self_influence_histogram,
)

PNG = b"\x89PNG\r\n\x1a\n"


def drawn(ax):
    return ax.images[0].get_array().data


@pytest.mark.parametrize(
    ("layout", "shape"),
    [("rgb_first", None), ("rgba_last", None), ("grey_flat", (4, 6)), ("one_channel", None)],
)
def test_influence_grid_shows_the_query_and_its_top_images(tmp_path, layout, shape):
    g = torch.Generator().manual_seed(0)
    make = {
        "rgb_first": lambda n: torch.rand(n, 3, 5, 7, generator=g),
        "rgba_last": lambda n: torch.rand(n, 5, 7, 4, generator=g),
        "grey_flat": lambda n: torch.randn(n, 24, generator=g),
        "one_channel": lambda n: torch.randn(n, 1, 5, 7, generator=g),
    }[layout]
    expect = {  # the picture each input should become, built independently
        "rgb_first": lambda x: x.permute(1, 2, 0),
        "rgba_last": lambda x: x,
        "grey_flat": lambda x: x.reshape(4, 6),
        "one_channel": lambda x: x[0],
    }[layout]
    queries, train = make(2), make(9)
    helps = TopK(torch.tensor([[3, 1], [8, 0]]), torch.tensor([[2.0, 1.0], [0.5, 0.25]]))
    hurts = TopK(torch.tensor([[4, 5], [6, 2]]), torch.tensor([[-3.0, -1.0], [-0.5, -0.125]]))
    path = tmp_path / "grid.png"
    fig = influence_grid(queries, train, helps, hurts, str(path), shape=shape, train_labels=[7] * 9)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 5
    for q in range(2):
        row = fig.axes[5 * q : 5 * q + 5]
        shown = [queries[q]] + [train[i] for i in helps.ids[q].tolist() + hurts.ids[q].tolist()]
        for ax, image in zip(row, shown, strict=True):
            np.testing.assert_array_equal(drawn(ax), expect(image).numpy())
        assert row[0].get_title() == f"query {q}"
        i, v = int(helps.ids[q, 0]), float(helps.values[q, 0])
        assert row[1].get_title() == f"#{i} label 7\n{v:+.3g}"
        assert row[1].spines["left"].get_edgecolor() != row[3].spines["left"].get_edgecolor()
    assert path.read_bytes()[:8] == PNG


def test_influence_grid_keeps_the_digits_demo_call(tmp_path):
    pytest.importorskip("sklearn")
    from logix_func.demo.digits import digits_split

    data = digits_split(torch.float32)
    helps = TopK(torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.ones(2, 3))
    hurts = TopK(torch.tensor([[6, 7, 8], [9, 10, 11]]), -torch.ones(2, 3))
    path = tmp_path / "influence.png"
    fig = influence_grid(data, [5, 9], helps, hurts, str(path))
    assert len(fig.axes) == 2 * 7 and path.read_bytes()[:8] == PNG
    np.testing.assert_array_equal(drawn(fig.axes[0]), data.test_x[5].reshape(8, 8).numpy())
    np.testing.assert_array_equal(drawn(fig.axes[7 + 6]), data.train_x[11].reshape(8, 8).numpy())
    assert fig.axes[7].get_title() == f"query #9\nlabel {int(data.test_y[9])}"
    assert fig.axes[1].get_title() == f"#0 label {int(data.train_y[0])}\n+1"


def test_influence_grid_rejects_images_it_cannot_show():
    helps = TopK(torch.tensor([[0]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="pass shape="):
        influence_grid(torch.rand(1, 64), torch.rand(3, 64), helps)
    with pytest.raises(ValueError, match="2 queries but top-k results for 1"):
        influence_grid(torch.rand(2, 4, 4), torch.rand(3, 4, 4), helps)


def test_self_influence_histogram_counts_and_flags(tmp_path):
    scores = torch.randn(200, generator=torch.Generator().manual_seed(3))
    scores[[17, 42]] = torch.tensor([9.0, 7.5])
    path = tmp_path / "self.png"
    fig = self_influence_histogram(scores, 3, str(path), ids=[f"x{i}" for i in range(200)], bins=20)
    (ax,) = fig.axes
    counts, _ = np.histogram(scores.numpy(), bins=20)
    assert [p.get_height() for p in ax.patches[:20]] == counts.tolist()
    assert ax.get_yscale() == "log"
    top3 = scores.topk(3).values.tolist()
    (ticks,) = ax.lines  # one red tick per flagged example
    assert list(ticks.get_xdata()) == pytest.approx(top3)
    assert ax.patches[-1].get_facecolor()[0] > 0.5  # the flagged range, shaded red
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "#x17, #x42, #x" + str(int(scores.topk(3).indices[2]))
    assert legend.get_texts()[0].get_text() == "flagged (3)"
    fig = self_influence_histogram(scores, [5, 17], log=False)
    assert list(fig.axes[0].lines[0].get_xdata()) == pytest.approx([float(scores[5]), 9.0])
    assert len(fig.axes[0].patches) == 50 and fig.axes[0].get_yscale() == "linear"
    assert path.read_bytes()[:8] == PNG


def test_proponent_table_lists_each_query_and_its_proponents(tmp_path):
    train = ["the cat sat", "a dog ran", "the bird sang " * 20, "fish swim"]
    helps = TopK(torch.tensor([[2, 0], [3, 1]]), torch.tensor([[1.5, 0.25], [2.0, -1.0]]))
    path = tmp_path / "table.png"
    fig = proponent_table(["cats?", "water"], train, helps, str(path), width=30)
    table = fig.axes[0].tables[0]
    cells = table.get_celld()
    rows = [[cells[r, c].get_text().get_text() for c in range(5)] for r in range(7)]
    assert rows == [
        ["query", "rank", "id", "score", "text"],
        ["0", "query", "", "", "cats?"],
        ["", "1", "2", "+1.5", "the bird sang the bird sang…"],
        ["", "2", "0", "+0.25", "the cat sat"],
        ["1", "query", "", "", "water"],
        ["", "1", "3", "+2", "fish swim"],
        ["", "2", "1", "-1", "a dog ran"],
    ]
    assert path.read_bytes()[:8] == PNG
    named = TopK([["b", "a"]], torch.tensor([[3.0, 1.0]]))  # string data ids
    fig = proponent_table(["q"], {"a": "text a", "b": "text b"}, named)
    cells = fig.axes[0].tables[0].get_celld()
    assert [cells[r, 4].get_text().get_text() for r in (2, 3)] == ["text b", "text a"]


def test_score_heatmap_cells_are_the_scores_centred_at_zero(tmp_path):
    scores = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]])
    path = tmp_path / "scores.png"
    fig = score_heatmap(
        scores, str(path), query_labels=["q0", "q1"], train_labels=["a", "b", "c"], title="t"
    )
    ax = fig.axes[0]
    np.testing.assert_array_equal(drawn(ax), scores.double().numpy())
    assert ax.images[0].get_clim() == (-4.0, 4.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q0", "q1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.get_title() == "t" and len(fig.axes) == 2  # the map and its colour bar
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="1 x labels for 3 x cells"):
        score_heatmap(scores, train_labels=["a"])
