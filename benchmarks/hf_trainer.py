"""Cost of the Trainer integration's stages next to one training epoch of the same Trainer.

    python -m benchmarks.hf_trainer [--repeats 3] [--examples 256] [--threads 1]

A random Llama (4 layers, hidden 128, vocabulary 512) on random token sequences of 64 tokens,
batch 16, on the CPU. Every row is the median of ``--repeats`` timed runs after one warm-up;
the stages take turns round after round. "x epoch" is time / one ``trainer.train()`` epoch
over the same examples (AdamW, mean loss). ``extract_log`` writes a fresh store each run;
"influence" is the query gradients of 16 sequences and their EKFAC scores against the log
(factors fitted beforehand).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import logix_func as lf
from logix_func.integrations.huggingface import Attribution, AttributionArguments

from .logra_models import interleaved_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    tokens = torch.randint(1, 512, (args.examples + 16, 64))
    data = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t} for t in tokens]
    train, queries = data[: args.examples], data[args.examples :]
    out = tempfile.mkdtemp()
    training = TrainingArguments(
        output_dir=out,
        report_to=[],
        use_cpu=True,
        num_train_epochs=1,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=LlamaForCausalLM(config), args=training, train_dataset=train)
    runs = iter(range(10**6))

    def fresh(method: str) -> Attribution:
        options = AttributionArguments(
            store=f"{out}/log-{next(runs)}", rank=args.rank, method=method, progress=False
        )
        return Attribution(trainer, options)

    fitted = fresh("ekfac")
    store, pre = fitted.extract_log(), fitted.preconditioner()
    cases: dict[str, Callable[[], object]] = {
        "trainer.train() epoch": trainer.train,
        "extract_log": lambda: fresh("none").extract_log(),
        "fit_curvature kfac": lambda: fresh("kfac").fit_curvature(),
        "fit_curvature ekfac": lambda: fresh("ekfac").fit_curvature(),
        "influence, 16 queries": lambda: lf.influence(
            fitted.grads(queries), store, preconditioner=pre
        ),
    }
    times = interleaved_times(cases, args.repeats)
    base = statistics.median(times["trainer.train() epoch"])
    print(
        f"Llama 4x128, {args.examples} sequences of 64 tokens, batch 16, LoGra rank {args.rank}, "
        f"threads {args.threads}"
    )
    print(f"{'stage':24s} {'s':>8s} {'x epoch':>8s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:24s} {t:8.2f} {t / base:8.2f}")


if __name__ == "__main__":
    main()
