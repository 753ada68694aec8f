"""Cost of per_sample_grads next to one plain forward+backward and a Python loop of autograd.

    python -m benchmarks.per_sample_grads            # MLP 784-1024-1024-10 (batch 256) and a
                                                     # 2-layer transformer (d=128, seq 64, batch 32)
    python -m benchmarks.per_sample_grads --small    # quick smoke run

Every figure is the median of ``--repeats`` timed runs after one warm-up run (compilation is
part of the warm-up, never of the timing); the methods take turns, round after round. Column
"x fwd+bwd" is time / the plain forward+backward of the same batch (summed loss, one
``.backward()``); "loop / it" is the Python loop's time / this method's (its speed-up). The
loop writes each sample's gradients into a preallocated ``[batch, *shape]`` output, the same
result per_sample_grads returns; the row "gradients discarded" shows what storing them costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from logix_func import per_sample_grads


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))  # fmt: skip


class TinyTransformer(nn.Module):
    """Token embedding + ``layers`` × nn.TransformerEncoderLayer + LM head, token targets."""

    def __init__(self, vocab: int, d: int, layers: int, seq: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.02 * torch.randn(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.pos[: ids.shape[1]]))


def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum")


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function; one warm-up each, then ``repeats`` rounds of all of them.

    Interleaving spreads any background load over every method alike.
    """
    for fn in fns.values():
        fn()  # warm-up (and compilation)
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> dict[str, float]:
    model.eval()
    params = dict(model.named_parameters())
    n, chunk = x.shape[0], max(1, x.shape[0] // 8)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        summed_ce(model(x), y).backward()

    def loop(keep: bool = True):
        out = {k: torch.empty(n, *p.shape) for k, p in params.items()} if keep else {}
        for i in range(n):
            loss = summed_ce(model(x[i : i + 1]), y[i : i + 1])
            for k, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                if keep:
                    out[k][i] = g
        return out

    fns = {
        "forward+backward (summed loss)": forward_backward,
        "loop of autograd.grad": loop,
        "  loop, gradients discarded": lambda: loop(keep=False),
        "per_sample_grads eager": lambda: per_sample_grads(model, params, (x, y)),
        f"  eager, chunk_size={chunk}": lambda: per_sample_grads(
            model, params, (x, y), chunk_size=chunk
        ),
    }
    if not args.no_compile:
        compiled = torch.compile(lambda p, b: per_sample_grads(model, p, b), fullgraph=True)
        fns["per_sample_grads compiled"] = lambda: compiled(params, (x, y))
    return interleaved_medians(fns, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="small sizes for a quick run")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*performance drop.*")  # vmap fallback notes
    torch.manual_seed(0)

    width, mlp_batch = (128, 32) if args.small else (1024, 256)
    d, seq, tf_batch, vocab = (32, 16, 8, 64) if args.small else (128, 64, 32, 256)
    tf = TinyTransformer(vocab, d, 2, seq)
    cases = [
        (f"MLP 784-{width}-{width}-10, batch {mlp_batch}", mlp(width),
         torch.randn(mlp_batch, 784), torch.randint(0, 10, (mlp_batch,))),
        (f"transformer 2x d={d}, seq {seq}, batch {tf_batch}", tf,
         torch.randint(0, vocab, (tf_batch, seq)), torch.randint(0, vocab, (tf_batch, seq))),
    ]  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    header = f"{'model':<40} {'method':<32} {'ms':>9} {'x fwd+bwd':>10} {'loop / it':>10}"
    print(header)
    print("-" * len(header))
    for name, model, x, y in cases:
        seconds = measure(model, x, y, args)
        base, loop = seconds["forward+backward (summed loss)"], seconds["loop of autograd.grad"]
        for label, s in seconds.items():
            print(f"{name:<40} {label:<32} {1e3 * s:>9.1f} {s / base:>10.2f} {loop / s:>10.2f}")


if __name__ == "__main__":
    main()
