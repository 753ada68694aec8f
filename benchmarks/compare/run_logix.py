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
    stage_of = ["curvature", "extract"]
    for epoch in scheduler:
        with rec.stage(stage_of[epoch]):
            offset = 0
            for x, y in train:
                with run(data_id=list(range(offset, offset + len(x)))):
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y, reduction="sum").backward()
                offset += len(x)
            run.finalize()
    with rec.stage("score"):
        run.eval()
        run.setup({"grad": ["log"]})
        with run(data_id=[f"q{i}" for i in range(len(x_query))]):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_query), y_query, reduction="sum").backward()
        loader = run.build_log_dataloader(batch_size=args.batch_size)
        result = run.compute_influence_all(run.get_log(), loader)
        columns = torch.as_tensor([int(i) for i in result["tgt_ids"]])
        scores = torch.empty_like(result["influence"])
        scores[:, columns] = result["influence"]
    rec.finish(args.result, scores, args.workdir, logix=logix.__version__)


if __name__ == "__main__":
    main()
