"""Tokens per second of projected-gradient extraction on a Hugging Face GPT-2.

    python -m benchmarks.lm_tokens [--threads 2] [--repeats 7] [--no-compile]

A random-weight GPT-2 (4 layers, d=256, 4 heads, vocabulary 1024, tied embeddings) on a batch of
8 sequences of 128 tokens, the last quarter of one sequence padded. One run prints side by side,
eager and ``torch.compile(fullgraph=True)`` (each against its own plain step):

* a plain forward+backward of the batch (summed next-token cross-entropy, weight gradients);
* ``projected_grads`` at rank 64 on every Conv1D layer (16 layers), without and with the
  per-token logs (``return_activations``);

as tokens per second and as the ratio of their time to the plain step. Times are the median of
``--repeats`` interleaved runs after a warm-up call; the best run's ratio is printed too (on a
machine shared with other work it is the least disturbed one).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import logix_func as lf
from logix_func.layers import projectable_layers

from .logra_models import interleaved_times


def model_and_batch(layers: int, width: int, length: int, batch: int):
    import transformers

    config = transformers.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=4,
        n_positions=length,
        vocab_size=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 1024, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, -length // 4 :] = 0
    return model, {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, -100),
    }


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(flat, labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, batch = model_and_batch(layers=4, width=256, length=128, batch=8)
    conv1d = [n for n, m in projectable_layers(model).items() if m.kind == "transposed_linear"]
    spec = lf.logra(model, args.rank, layers=conv1d)
    params = {n: p.detach() for n, p in model.named_parameters()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def plain(m):
        def step():
            model.zero_grad(set_to_none=True)
            causal_loss(m(**inputs).logits, batch["labels"]).backward()

        return step

    def ours(logs):
        def call(p, b):
            return lf.projected_grads(model, p, b, spec, return_activations=logs)

        return call

    runs = {"eager plain": plain(model)}
    for logs in (False, True):
        call = ours(logs)
        runs[f"eager projected{' +logs' * logs}"] = lambda c=call: c(params, batch)
    if not args.no_compile:
        runs["compiled plain"] = plain(torch.compile(model))
        for logs in (False, True):
            call = torch.compile(ours(logs), fullgraph=True)
            runs[f"compiled projected{' +logs' * logs}"] = lambda c=call: c(params, batch)
    times = interleaved_times(runs, args.repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    tokens = batch["input_ids"].numel()
    print(
        f"GPT-2 4×256, {tokens} tokens per batch, rank {args.rank} on {len(conv1d)} Conv1D "
        f"layers, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'':26s} {'median ms':>10s} {'tokens/s':>9s} {'× plain':>8s} {'best × plain':>13s}")
    for key, t in median.items():
        plain_key = key.split()[0] + " plain"
        ratio, best_ratio = t / median[plain_key], best[key] / best[plain_key]
        print(f"{key:26s} {t * 1e3:10.1f} {tokens / t:9.0f} {ratio:8.2f} {best_ratio:13.2f}")


if __name__ == "__main__":
    main()
