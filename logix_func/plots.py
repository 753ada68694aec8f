"""Pictures of attributions: each query image beside its most influential training images."""

from __future__ import annotations

from typing import Any


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
