"""EKFAC's eigenvalue-correction pass from the token logs against from the gradients.

    python -m benchmarks.ekfac_tokens [--repeats 7] [--threads 1]

Cases: the digits MLP 64-32-10 (1300 training images, batches of 325, full rank, exact and true
Fisher) and a random-weight GPT-2 (2 layers, d=64, vocabulary 256, tied embeddings; 4 batches of
8 sequences of 32 tokens, the last quarter of one padded; true Fisher; full rank and LoGra 16).
For each, the EKFAC pass of ``fit_curvature`` (``fisher_logs`` + ``ekfac.update`` per batch) is
timed with ``update(state, grads, logs)`` (each layer takes the cheaper route) and with
``update(state, grads)`` (every gradient rotated), and so is ``update`` alone on the same
precomputed logs. Times are medians of ``--repeats`` interleaved runs after a warm-up; the
ratio is logs / grads (below 1: the logs route is faster). "token layers" counts the layers the
cost model sends to the token route.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import logix_func as lf
from logix_func.curvature._ekfac import tokens_are_cheaper
from logix_func.demo.digits import digits_split, mlp_model, train_mlp


def digits_case() -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[Any]]:
    data = digits_split(torch.float32)
    model = mlp_model(dtype=torch.float32).eval()
    params = {k: v.float() for k, v in train_mlp(data.train_x, data.train_y, 0).items()}
    model.load_state_dict(params)
    batches = list(zip(data.train_x.split(325), data.train_y.split(325), strict=True))
    return model, dict(model.named_parameters()), batches


def gpt2_case() -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[Any]]:
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=256, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 256, (8, 32))
        mask = torch.ones_like(ids)
        mask[0, -8:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return model, dict(model.named_parameters()), batches


def measure(
    label: str,
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    batches: list[Any],
    spec: Any,
    fisher: Any,
    repeats: int,
) -> None:
    factors = lf.fit_curvature(
        model, params, batches, spec, method="kfac", fisher=fisher, progress=False
    )
    e = lf.ekfac(factors)
    logged = [
        lf.fisher_logs(model, params, b, spec, fisher=fisher, seed=i) for i, b in enumerate(batches)
    ]
    grads, logs = logged[0]
    tokens = sum(
        tokens_are_cheaper(g.shape[1], logs[n]["activations"].shape[1], *g.shape[-2:])
        for n, g in grads.items()
    )

    def ekfac_pass(with_logs: bool) -> None:
        state = e.init()
        for i, b in enumerate(batches):
            g, lg = lf.fisher_logs(model, params, b, spec, fisher=fisher, seed=i)
            state = e.update(state, g, lg if with_logs else None)
        e.finalize(state)

    def updates(with_logs: bool) -> None:
        state = e.init()
        for g, lg in logged:
            state = e.update(state, g, lg if with_logs else None)
        e.finalize(state)

    runs: dict[str, Callable[[], None]] = {
        "pass logs": lambda: ekfac_pass(True),
        "pass grads": lambda: ekfac_pass(False),
        "update logs": lambda: updates(True),
        "update grads": lambda: updates(False),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    passes = f"{ms['pass logs']:.1f}/{ms['pass grads']:.1f}"
    updates_ms = f"{ms['update logs']:.1f}/{ms['update grads']:.1f}"
    print(
        f"{label:34s} {f'{tokens}/{len(grads)}':>12s} "
        f"{ms['pass logs'] / ms['pass grads']:10.2f} "
        f"{ms['update logs'] / ms['update grads']:12.2f}"
    )
    print(f"{'':34s} {'':>12s} {passes:>10s} {updates_ms:>12s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    digits, gpt2 = digits_case(), gpt2_case()
    cases = [
        ("digits MLP, exact Fisher", digits, None, "exact"),
        ("digits MLP, true Fisher", digits, None, "true"),
        ("GPT-2 d=64 T=32, full, true", gpt2, None, "true"),
        ("GPT-2 d=64 T=32, LoGra 16, true", gpt2, 16, "true"),
    ]
    print(f"threads {args.threads}, median of {args.repeats}; ratio = logs route / grads route")
    print(f"{'case':34s} {'token layers':>12s} {'pass ratio':>10s} {'update ratio':>12s}")
    print(f"{'':34s} {'':>12s} {'(ms/ms)':>10s} {'(ms/ms)':>12s}")
    for label, (model, params, batches), rank, fisher in cases:
        measure(label, model, params, batches, lf.logra(model, rank=rank), fisher, args.repeats)


if __name__ == "__main__":
    main()
