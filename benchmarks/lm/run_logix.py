"""LogIX (logix-ai) with LoGra + EKFAC on the Shakespeare GPT; run with the peers' python.

As the digits runner (``benchmarks/compare/run_logix.py``): ``LogIXScheduler(lora="random",
hessian="ekfac", save="grad")`` over the model's ``nn.Linear`` layers (LogIX's default; the
embeddings are not covered), a covariance pass then a logging pass with the eigenvalue
correction, then ``compute_influence_all`` of the query log against the saved training logs.
Loss: the summed token cross-entropy of each window. Options: ``{"rank": 64}``.
"""

from __future__ import annotations

import os

import logix
import torch.nn.functional as F

from benchmarks.compare.common import Recorder, load_problem, parse_args
from benchmarks.compare.logix_ekfac import ekfac_scores
from benchmarks.lm.problem import build_model, window_batches


def summed_loss(model, x, y):
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="sum")


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    model = build_model(problem["params"])
    train = window_batches(problem["train"], args.batch_size)
    query = window_batches(problem["query"], len(problem["query"]))[0]  # one batch: all
    rank = args.options.get("rank", 64)
    config = os.path.join(args.workdir, "config.yaml")
    with open(config, "w") as f:
        f.write(f"root_dir: {args.workdir}\nlora:\n  rank: {rank}\n")

    rec = Recorder()
    run = logix.LogIX(project="lm", config=config)
    run.watch(model)
    scheduler = logix.LogIXScheduler(run, lora="random", hessian="ekfac", save="grad")
    scores = ekfac_scores(
        run, scheduler, model, train, query, summed_loss, args.batch_size, rec.stage
    )
    rec.finish(args.result, scores, args.workdir, logix=logix.__version__)


if __name__ == "__main__":
    main()
