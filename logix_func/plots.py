"""Pictures of attributions, as matplotlib Figures (not registered with ``pyplot``).

Each function returns a ``matplotlib.figure.Figure`` and saves it to ``path`` when one is given.
Show one in a notebook as the last value of a cell (or ``IPython.display.Image(path)``).

- :func:`influence_grid`: each query image beside its top proponents and opponents (images of
  any shape and channel count);
- :func:`self_influence_histogram`: the distribution of self-influence, flagged examples marked;
- :func:`proponent_table`: each query text above its top proponents' texts, ids and scores;
- :func:`score_heatmap`: a query × training score matrix;
- :func:`token_heatmap`: one sequence's per-token scores as coloured token cells.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ._influence import TopK

PROPONENT, OPPONENT = "tab:green", "tab:red"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))  # no pyplot state: nothing to close


def _save(fig: Any, path: str | None) -> Any:
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _ids(best: TopK, row: int) -> list:
    ids = best.ids[row]
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


def _item(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value


def as_image(x: Any, shape: Sequence[int] | None = None) -> Tensor:
    """An image ``[H, W]`` (grey) or ``[H, W, 3 | 4]`` (colour) from ``x`` reshaped to ``shape``.

    ``[H, W]`` is grey; ``[C, H, W]`` (channels first, as torchvision) or ``[H, W, C]`` with
    ``C`` in 1, 3, 4 is grey, RGB or RGBA; other channel counts are shown as their mean, grey.
    Colour values are used as they are (floats in ``[0, 1]`` or integers in ``[0, 255]``).
    """
    t = torch.as_tensor(x).detach().cpu()
    t = t.reshape(tuple(shape)) if shape is not None else t
    if t.dim() == 2:
        return t
    if t.dim() != 3:
        raise ValueError(
            f"an image must be [H, W], [C, H, W] or [H, W, C], got shape {tuple(t.shape)}; "
            "pass shape= to reshape flattened images"
        )
    if t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # channels first -> last
    if t.shape[-1] == 1:
        return t[..., 0]
    return t if t.shape[-1] in (3, 4) else t.float().mean(-1)


def influence_grid(
    queries: Any,
    train: Any,
    helps: TopK,
    hurts: TopK | None = None,
    path: str | None = None,
    *,
    shape: Sequence[int] | None = None,
    query_titles: Sequence[str] | None = None,
    train_labels: Any = None,
    cmap: str = "gray_r",
) -> Any:
    """A grid with one row per query: the query image, its proponents, then its opponents.

    ``queries`` holds the query images (``[Q, ...]``); ``train[i]`` is the image of training id
    ``i``, for the ids of ``helps``/``hurts`` (:class:`~logix_func._influence.TopK` results): a
    tensor ``[N, ...]`` for int ids, a mapping for string ids. Images are read by :func:`as_image`
    (``shape`` reshapes flattened ones). Proponent titles give the id, the label
    ``train_labels[i]`` if given, and the score; their frames are green, opponents' red.

    The older form ``influence_grid(data, query_positions, helps, hurts, path)`` of the digits
    demo (``data`` with ``train_x``/``train_y``/``test_x``/``test_y``) still works.
    """
    if hasattr(queries, "test_x"):  # the digits demo's call
        data, positions = queries, list(train)
        return influence_grid(
            data.test_x[positions],
            data.train_x,
            helps,
            hurts,
            path,
            shape=(8, 8),
            query_titles=[f"query #{q}\nlabel {int(data.test_y[q])}" for q in positions],
            train_labels=data.train_y,
        )
    n = len(queries)
    if query_titles is not None and len(query_titles) != n:
        raise ValueError(f"{n} queries but {len(query_titles)} query titles")
    groups = [(helps, PROPONENT)] + ([] if hurts is None else [(hurts, OPPONENT)])
    for best, _ in groups:
        if len(best.values) != n:
            raise ValueError(f"{n} queries but top-k results for {len(best.values)}")
    cols = 1 + sum(best.values.shape[1] for best, _ in groups)
    fig = _figure(1.45 * cols, 1.95 * n)
    axes = fig.subplots(n, cols, squeeze=False)
    for row in range(n):
        title = f"query {row}" if query_titles is None else query_titles[row]
        panels = [(queries[row], title, "black")]
        for best, colour in groups:
            for i, v in zip(_ids(best, row), best.values[row].tolist(), strict=True):
                label = "" if train_labels is None else f" label {_item(train_labels[i])}"
                panels.append((train[i], f"#{i}{label}\n{v:+.3g}", colour))
        for ax, (image, title, colour) in zip(axes[row], panels, strict=True):
            ax.imshow(as_image(image, shape).numpy(), cmap=cmap, interpolation="nearest")
            ax.set_title(title, fontsize=8, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2)
    kinds = "top proponents (green, help)" + (
        "" if hurts is None else " | top opponents (red, hurt)"
    )
    fig.suptitle(f"Query | {kinds}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def self_influence_histogram(
    scores: Float[Tensor, " n"],
    flagged: int | Sequence[int] = 10,
    path: str | None = None,
    *,
    ids: Any = None,
    bins: int = 50,
    log: bool = True,
    title: str | None = None,
) -> Any:
    """A histogram of self-influence scores ``[N]``, flagged examples marked in red.

    ``flagged`` is how many of the highest scores to flag (their range is shaded), or the
    positions (in ``scores``) of the examples to flag; each flagged score is a red tick on the
    axis, and ``ids`` names the first of them in the legend (default: the positions). ``log``:
    a logarithmic count axis, so that the few examples of the tail stay visible.
    High self-influence marks examples the model fits only by memorising them: mislabelled,
    atypical or duplicated data.
    """
    values = torch.as_tensor(scores).detach().cpu().double().flatten()
    if not len(values) or not torch.isfinite(values).all():
        raise ValueError("the scores must be a non-empty tensor of finite values")
    if isinstance(flagged, int):
        marked = values.argsort(descending=True)[:flagged].tolist()
    else:
        marked = [int(i) for i in flagged]
    names = list(range(len(values))) if ids is None else list(ids)
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    ax.hist(values.numpy(), bins=bins, color="0.6", log=log)
    if marked:
        ticks = [float(values[i]) for i in marked]
        ax.plot(ticks, [0] * len(ticks), "|", color=OPPONENT, markersize=16, markeredgewidth=1.5,
                clip_on=False, transform=ax.get_xaxis_transform(),  # y: the axis, any scale
                label=f"flagged ({len(marked)})")  # fmt: skip
        if isinstance(flagged, int):
            ax.axvspan(min(ticks), max(ticks), color=OPPONENT, alpha=0.1, linewidth=0)
        shown = ", ".join(f"#{names[i]}" for i in marked[:8]) + (", …" if len(marked) > 8 else "")
        ax.legend(title=shown, fontsize=8, title_fontsize=8)
    ax.set_xlabel("self-influence")
    ax.set_ylabel("examples (log scale)" if log else "examples")
    ax.set_title(title or f"Self-influence of {len(values)} examples")
    return _save(fig, path)


def proponent_table(
    query_texts: Sequence[str],
    train_texts: Any,
    helps: TopK,
    path: str | None = None,
    *,
    width: int = 70,
    title: str | None = None,
) -> Any:
    """A table: each query's text, then its top proponents' ids, scores and texts.

    ``train_texts[i]`` is the text of training id ``i``; texts are shortened to ``width``
    characters. Columns: ``query``, ``rank``, ``id``, ``score``, ``text``; the query's own row
    has rank ``"query"``.
    """
    if len(helps.values) != len(query_texts):
        raise ValueError(f"{len(query_texts)} queries but top-k results for {len(helps.values)}")
    short = lambda t: textwrap.shorten(str(t), width, placeholder="…")  # noqa: E731
    cells = []
    for q, text in enumerate(query_texts):
        cells.append([str(q), "query", "", "", short(text)])
        for rank, (i, v) in enumerate(zip(_ids(helps, q), helps.values[q].tolist(), strict=True)):
            cells.append(["", str(rank + 1), str(i), f"{v:+.3g}", short(train_texts[i])])
    fig = _figure(2.2 + 0.075 * width, 0.22 * (len(cells) + 1) + 0.4)
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        colLabels=["query", "rank", "id", "score", "text"],
        colWidths=[0.06, 0.07, 0.07, 0.1, 0.7],
        cellLoc="left",
        bbox=(0, 0, 1, 1),  # the rows fill the axes
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (r, c), cell in table.get_celld().items():
        cell.PAD = 0.03 if c == 4 else 0.1  # the text column is wide: a narrower margin
        if r > 0 and cells[r - 1][1] == "query":
            cell.set_facecolor("0.9")
    ax.set_title(title or "Top proponents of each query", fontsize=10)
    return _save(fig, path)


def score_heatmap(
    scores: Float[Tensor, "queries train"],
    path: str | None = None,
    *,
    query_labels: Sequence[str] | None = None,
    train_labels: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "RdBu",
) -> Any:
    """The score matrix ``[Q, N]`` as coloured cells, diverging and centred at 0 (blue: the
    training example helps the query, red: it hurts), with a colour bar."""
    values = torch.as_tensor(scores).detach().cpu().double()
    if values.dim() != 2 or not values.numel() or not torch.isfinite(values).all():
        raise ValueError(f"scores must be a finite [Q, N] matrix, got shape {tuple(values.shape)}")
    q, n = values.shape
    bound = float(values.abs().max()) or 1.0
    fig = _figure(min(2 + 0.35 * n, 16), min(1.5 + 0.35 * q, 12))
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
    for labels, axis, count in ((query_labels, "y", q), (train_labels, "x", n)):
        if labels is not None:
            if len(labels) != count:
                raise ValueError(f"{len(labels)} {axis} labels for {count} {axis} cells")
            getattr(ax, f"set_{axis}ticks")(range(count), labels=list(labels), fontsize=8)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel("training example")
    ax.set_ylabel("query")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="score")
    if title is not None:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


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
