"""The models and batches of the LoGra benchmark (torch only, shared with the LogIX run)."""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F
from torch import nn

RANK = 64


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


class Block(nn.Module):
    """Pre-norm transformer block: q/k/v and out projections, F.scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            f(h).reshape(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Transformer(nn.Module):
    """2-layer causal language model: token + position embeddings, blocks, tied-free head."""

    def __init__(self, vocab: int = 512, d: int = 256, layers: int = 2, length: int = 128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.Sequential(*(Block(d, 4) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.blocks(self.tok(ids) + self.pos(positions))))


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model (eval mode) and its batch: MLP at batch 256, transformer at 8 × 128 tokens."""
    torch.manual_seed(seed)
    if name == "mlp":
        return mlp().eval(), (torch.randn(256, 784), torch.randint(0, 10, (256,)))
    model = Transformer().eval()
    ids = torch.randint(0, 512, (8, 128))
    return model, (ids, torch.roll(ids, -1, dims=1))


def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over samples and tokens (the loss of every method here)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum")


def linear_layers(model: nn.Module) -> list[str]:
    """The nn.Linear modules: the layers both LoGra implementations project."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(fn, release=None) -> float | None:
    """Peak resident memory above the starting point while ``fn()`` runs, in MiB.

    ``release()`` first frees what a previous call left behind (``.grad``, logs), then the
    kernel's high-water mark is reset (``/proc/self/clear_refs``), so the figure is the call's
    own working memory, outputs included. None where /proc does not allow it.
    """
    if release is not None:
        release()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def interleaved_times(runs: dict, repeats: int, warm_up: bool = True) -> dict[str, list[float]]:
    """Wall times of ``repeats`` interleaved runs of each callable (load changes hit all alike),
    after a warm-up call of each unless ``warm_up=False``."""
    if warm_up:
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def best_times(runs: dict, repeats: int, warm_up: bool = True) -> dict[str, float]:
    """Best of :func:`interleaved_times` for each callable."""
    return {k: min(v) for k, v in interleaved_times(runs, repeats, warm_up).items()}
