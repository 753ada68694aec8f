"""LogIX (logix-ai) with LoGra + EKFAC, its documented workflow; run with the peers' python.

``LogIXScheduler(lora="random", hessian="ekfac", save="grad")`` as its Hugging Face integration
uses it: ``add_lora()`` (random LoRA encoder/decoder, rank ``options["rank"]`` capped at
min(in, out) per layer), a pass collecting forward/backward covariances, then a pass that logs
and saves the per-sample LoRA gradients while accumulating the EKFAC eigenvalues; then
``compute_influence_all`` of the query log against the saved training logs. Damping: LogIX's
default ``None`` = 0.1 × the mean EKFAC eigenvalue (of the first layer, reused for the others).
Options: ``{"rank": 64, "lora": true}`` (``lora: false`` = full gradients, no LoRA).

Stages: the covariance pass and the SVD (curvature), the logging pass with the eigenvalue
correction (extract; LogIX fuses the two), the query log and ``compute_influence_all`` (score).
"""

from __future__ import annotations

import os

import logix
import torch
import torch.nn.functional as F
from common import Recorder, batches, build_model, load_problem, parse_args
from logix_ekfac import ekfac_scores


def summed_loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="sum")


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    params = problem["params"]
    torch.set_default_dtype(params["0.weight"].dtype)  # LoRA modules in the model's dtype
    model = build_model(params)
    train = batches(problem["train"], args.batch_size)
    x_query, y_query = problem["query"]
    rank, lora = args.options.get("rank", 64), args.options.get("lora", True)
    config = os.path.join(args.workdir, "config.yaml")
    with open(config, "w") as f:
        f.write(f"root_dir: {args.workdir}\nlora:\n  rank: {rank}\n")

    rec = Recorder()
    run = logix.LogIX(project="compare", config=config)
    run.watch(model)
    scheduler = logix.LogIXScheduler(
        run, lora="random" if lora else "none", hessian="ekfac", save="grad"
    )
    scores = ekfac_scores(
        run, scheduler, model, train, (x_query, y_query), summed_loss, args.batch_size, rec.stage
    )
    rec.finish(args.result, scores, args.workdir, logix=logix.__version__)


if __name__ == "__main__":
    main()
