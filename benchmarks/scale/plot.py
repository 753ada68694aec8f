"""One figure of cost against N and model size, from the JSON the scale benchmarks write.

python -m benchmarks.scale.plot   # reads scoring.json and gpt2.json, writes scale.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    scoring = json.loads((HERE / "scoring.json").read_text())
    models = json.loads((HERE / "gpt2.json").read_text())
    fig, (time_ax, mem_ax, size_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    n = [r["rows"] for r in scoring["results"]]
    for case, style in (
        ("read+matmul", "k--"),
        ("influence (default)", "C0o-"),
        ("influence (chunk_rows=4096)", "C1s-"),
        ("self_influence", "C2^-"),
    ):
        time_ax.loglog(n, [r["seconds"][case] for r in scoring["results"]], style, label=case)
    time_ax.set(xlabel="stored rows N", ylabel="seconds", title=f"scoring {scoring['queries']} "
                "queries (2 layers × [8, 8], zstd)")  # fmt: skip
    time_ax.legend(fontsize=8)
    for case, style in (("influence_chunks → top_k", "C0o-"), ("self_influence", "C2^-")):
        mem_ax.semilogx(n, [r["peak_mib"][case] for r in scoring["results"]], style, label=case)
    mem_ax.set(xlabel="stored rows N", ylabel="peak extra RSS (MiB)", title="streaming memory")
    mem_ax.set_ylim(bottom=0)
    mem_ax.legend(fontsize=8)
    params = [m["parameters"] / 1e6 for m in models]
    for key, style in (("projected_grads", "C0o-"), ("EKFAC (both passes, 1 batch)", "C3s")):
        xs = [p for p, m in zip(params, models, strict=True) if key in m["seconds"]]
        ys = [m["seconds"][key] / m["seconds"]["train step"] for m in models if key in m["seconds"]]
        size_ax.semilogx(xs, ys, style, label=f"{key} (eager)")
    compiled = [m for m in models if "projected_grads compiled" in m["seconds"]]
    for m in compiled:
        s = m["seconds"]
        ratio = s["projected_grads compiled"] / s["train step compiled"]
        size_ax.semilogx([m["parameters"] / 1e6], [ratio], "C1D", label="projected_grads compiled")
    size_ax.axhline(1, color="k", lw=0.8, ls="--")
    size_ax.set(xlabel="GPT-2 parameters (millions)", ylabel="time / training step",
                title="extraction and EKFAC, 4 × 128 tokens, rank 64")  # fmt: skip
    size_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "scale.png", dpi=110)


if __name__ == "__main__":
    main()
