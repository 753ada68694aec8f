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
import torch
import torch.nn.functional as F

from benchmarks.compare.common import Recorder, load_problem, parse_args
from benchmarks.lm.problem import build_model, window_batches


def summed_loss(model, x, y):
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="sum")


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    model = build_model(problem["params"])
    train = window_batches(problem["train"], args.batch_size)
    (x_query, y_query), n_query = (
        window_batches(problem["query"], len(problem["query"]))[0],
        len(problem["query"]),
    )
    rank = args.options.get("rank", 64)
    config = os.path.join(args.workdir, "config.yaml")
    with open(config, "w") as f:
        f.write(f"root_dir: {args.workdir}\nlora:\n  rank: {rank}\n")

    rec = Recorder()
    run = logix.LogIX(project="lm", config=config)
    run.watch(model)
    scheduler = logix.LogIXScheduler(run, lora="random", hessian="ekfac", save="grad")
    stage_of = ["curvature", "extract"]
    for epoch in scheduler:
        with rec.stage(stage_of[epoch]):
            offset = 0
            for x, y in train:
                with run(data_id=list(range(offset, offset + len(x)))):
                    model.zero_grad(set_to_none=True)
                    summed_loss(model, x, y).backward()
                offset += len(x)
            run.finalize()
    with rec.stage("score"):
        run.eval()
        run.setup({"grad": ["log"]})
        with run(data_id=[f"q{i}" for i in range(n_query)]):
            model.zero_grad(set_to_none=True)
            summed_loss(model, x_query, y_query).backward()
        loader = run.build_log_dataloader(batch_size=args.batch_size)
        result = run.compute_influence_all(run.get_log(), loader)
        columns = torch.as_tensor([int(i) for i in result["tgt_ids"]])
        scores = torch.empty_like(result["influence"])
        scores[:, columns] = result["influence"]
    rec.finish(args.result, scores, args.workdir, logix=logix.__version__)


if __name__ == "__main__":
    main()
