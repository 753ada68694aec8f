"""What recording provenance costs: ``weights_fingerprint`` of GPT-2 small (124M parameters)
against one ``projected_grads`` call on a batch of 4 × 128 tokens (rank 64, every layer).

The fingerprint is computed once per ``log_dataset`` / ``fit_curvature`` call (and per Trainer
attribution call), the gradients once per batch: the ratio says how many batches one
fingerprint costs. ``python -m benchmarks.fingerprint``.
"""

from __future__ import annotations

import torch
import transformers

import logix_func as lf
from benchmarks.logra_models import best_times


def main() -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=64)
    ids = torch.randint(0, model.config.vocab_size, (4, 128))
    batch = {"input_ids": ids, "labels": ids}
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    times = best_times(
        {
            "fingerprint": lambda: lf.weights_fingerprint(model, params),
            "projected_grads": lambda: lf.projected_grads(model, params, batch, spec),
        },
        repeats=3,
    )
    fp, grads = times["fingerprint"], times["projected_grads"]
    print(f"threads {torch.get_num_threads()}, parameters {size / 1e6:.0f} MB")
    print(f"weights_fingerprint: {fp:.3f} s ({size / fp / 1e9:.2f} GB/s)")
    print(f"projected_grads 4x128, rank 64: {grads:.3f} s")
    print(f"fingerprint / one batch of gradients: {fp / grads:.3f}")


if __name__ == "__main__":
    main()
