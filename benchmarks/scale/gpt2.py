"""Extraction and curvature cost of GPT-2-shaped models (random weights, no download).

    python -m benchmarks.scale.gpt2 [--sizes 4x256 6x512 12x768] [--repeats 3] [--compile]

For each ``n_layer × n_embd`` (vocabulary 50,257, 1,024 positions; ``12x768`` is GPT-2 small,
124M parameters) and a batch of 4 sequences of 128 tokens, times (best of ``--repeats``
interleaved runs, torch threads as set by the environment):

- ``train step``: a plain forward+backward of the model's own loss (``labels=input_ids``), the
  weight gradients included: the basis of every ratio;
- ``projected_grads``: ``logra(rank=64)`` on every projectable layer (50 on GPT-2 small: tied
  embeddings, positions, 48 Conv1D), the model's summed token loss;
- with ``--compile``, the same two under ``torch.compile(fullgraph=True)`` for the largest size
  (compile time reported apart);
- ``EKFAC``: ``fit_curvature(method="ekfac")`` over one batch (both passes: the factors, then
  the eigenvalue correction; true Fisher), for the largest size.

Also prints bytes per stored row (float32) for ranks 16, 32, 64, 128 and the full gradients.
Writes ``benchmarks/scale/gpt2.json`` (``--out``) for ``benchmarks.scale.plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import logix_func as lf

from ..logra_models import best_times

HERE = Path(__file__).resolve().parent
BATCH, TOKENS, RANK = 4, 128, 64


def gpt2(n_layer: int, n_embd: int) -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def measure(n_layer: int, n_embd: int, repeats: int, compiled: bool, ekfac: bool) -> dict:
    model = gpt2(n_layer, n_embd)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS))
    batch = {"input_ids": ids, "labels": ids}
    params = {n: p.detach() for n, p in model.named_parameters()}
    spec = lf.logra(model, rank=RANK)

    def step(m):
        def run():
            model.zero_grad(set_to_none=True)
            m(**batch).loss.backward()

        return run

    def extract(p, b):
        return lf.projected_grads(model, p, b, spec)

    runs = {"train step": step(model), "projected_grads": lambda: extract(params, batch)}
    compile_s = {}
    if compiled:
        fast_model, fast_extract = torch.compile(model), torch.compile(extract, fullgraph=True)
        for key, fn in (
            ("train step compiled", step(fast_model)),
            ("projected_grads compiled", lambda: fast_extract(params, batch)),
        ):
            start = time.perf_counter()
            fn()
            compile_s[key] = time.perf_counter() - start
            runs[key] = fn
    times = best_times(runs, repeats)
    model.zero_grad(set_to_none=True)
    if ekfac:
        start = time.perf_counter()
        lf.fit_curvature(model, params, [batch], spec, method="ekfac", progress=False)
        times["EKFAC (both passes, 1 batch)"] = time.perf_counter() - start
    size = {str(r): lf.logra(model, rank=r).row_size().total_bytes for r in (16, 32, 64, 128, None)}
    return {
        "size": f"{n_layer}x{n_embd}",
        "parameters": sum(p.numel() for p in params.values()),
        "layers": len(spec.layers),
        "tokens": BATCH * TOKENS,
        "seconds": times,
        "compile_seconds": compile_s,
        "row_bytes": size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4x256", "6x512", "12x768"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time compiled (largest)")
    parser.add_argument("--out", default=str(HERE / "gpt2.json"))
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    results = []
    for i, size in enumerate(args.sizes):
        last = i == len(args.sizes) - 1
        n_layer, n_embd = map(int, size.split("x"))
        r = measure(n_layer, n_embd, args.repeats, args.compile and last, last)
        results.append(r)
        print(f"\n== GPT-2 {size}: {r['parameters'] / 1e6:.1f}M parameters, {r['layers']} layers")
        t = r["seconds"]
        for key, s in t.items():
            base = t["train step compiled" if "compiled" in key else "train step"]
            print(f"{key:30} {s:8.3f} s {r['tokens'] / s:9.0f} tokens/s {s / base:6.2f}× step")
        for key, s in r["compile_seconds"].items():
            print(f"{key:30} first call (compiling) {s:.0f} s")
        print("bytes per row: " + ", ".join(f"rank {k}: {v:,}" for k, v in r["row_bytes"].items()))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
