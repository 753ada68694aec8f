"""Pictures of attributions: each query image beside its most influential training images, and
one sequence's per-token scores as coloured token cells."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from jaxtyping import Float
from torch import Tensor


def influence_grid(data: Any, queries: list[int], helps: Any, hurts: Any, path: str) -> None:
    """Save a grid: one row per query — the query, its proponents, then its opponents.

    ``data`` has ``train_x``/``train_y``/``test_x``/``test_y`` (8×8 digit images flattened);
    ``helps``/``hurts`` are :class:`~logix_func.influence.TopK` results over training ids.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = helps.values.shape[1]
    cols = 1 + 2 * k
    fig, axes = plt.subplots(
        len(queries), cols, figsize=(1.45 * cols, 1.95 * len(queries)), squeeze=False
    )
    for row, q in enumerate(queries):
        panels = [(data.test_x[q], f"query #{q}\nlabel {int(data.test_y[q])}", "black")]
        for best, colour in ((helps, "tab:green"), (hurts, "tab:red")):
            for t, v in zip(best.ids[row], best.values[row].tolist(), strict=True):
                t = int(t)
                panels.append(
                    (data.train_x[t], f"#{t} label {int(data.train_y[t])}\n{v:+.3g}", colour)
                )
        for ax, (image, title, colour) in zip(axes[row], panels, strict=True):
            ax.imshow(image.reshape(8, 8).numpy(), cmap="gray_r", interpolation="nearest")
            ax.set_title(title, fontsize=8, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2)
    fig.suptitle("Query | top proponents (green, help) | top opponents (red, hurt)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_heatmap(
    tokens: Sequence[str],
    scores: Float[Tensor, " tokens"] | Sequence[float],
    path: str | None = None,
    *,
    title: str | None = None,
    line_chars: int = 60,
    cmap: str = "RdBu",
) -> Any:
    """Draw one sequence's tokens as cells coloured by their scores; returns the Figure.

    ``scores[t]`` is the score of token ``t`` (e.g. ``lf.token_influence(...)[q, n]`` without
    the padded positions). The colours are diverging and centred at 0: with the default
    ``"RdBu"``, blue cells raise the score (help the query), red ones lower it, white ones do
    nothing. Cells are as wide as their token and wrap after ``line_chars`` characters. The
    figure is saved to ``path`` if given; it is not registered with ``pyplot`` (show it with
    ``IPython.display.Image(path)``, or as the last value of a notebook cell).
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values = [float(v) for v in scores]
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} scores")
    if not values:
        raise ValueError("no tokens to draw")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("the scores are not all finite")
    bound = max(abs(v) for v in values) or 1.0  # all zero: any scale
    norm, colours = Normalize(-bound, bound), matplotlib.colormaps[cmap]
    cells, x, line = [], 0.0, 0
    for token, value in zip(tokens, values, strict=True):
        width = max(len(token), 2) + 1.0
        if x > 0 and x + width > line_chars:
            x, line = 0.0, line + 1
        cells.append((token, value, x, line, width))
        x += width
    lines, used = line + 1, max(x + width for *_, x, _, width in cells)
    fig = Figure(figsize=(0.13 * used + 1.4, 0.45 * lines + 0.7))  # no pyplot state
    ax = fig.add_subplot()
    for token, value, x, line, width in cells:
        ax.add_patch(
            Rectangle((x, -line - 1), width, 0.9, facecolor=colours(norm(value)), edgecolor="0.6")
        )
        ink = "white" if abs(norm(value) - 0.5) > 0.3 else "black"  # readable on dark cells
        ax.text(x + width / 2, -line - 0.55, token, ha="center", va="center", color=ink)
    ax.set_xlim(0, used)
    ax.set_ylim(-lines - 0.1, 0)
    ax.axis("off")
    fig.colorbar(ScalarMappable(norm=norm, cmap=colours), ax=ax, fraction=0.03, pad=0.01)
    if title is not None:
        ax.set_title(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
