"""TRAK (traker) with one checkpoint and its CPU ``BasicProjector``; run with the peers' python.

``TRAKer(task="image_classification")`` (gradients of the correct-class margin, TRAK's own
output function, and its out-to-loss reweighting), Rademacher projection to
``options["proj_dim"]`` dimensions, ``lambda_reg`` = TRAK's default 0, in the model's dtype.
The default 256 is the best of 128, 256, 512 and 1024 on both digits problems: with 1300
training rows, ΦᵀΦ grows ill-conditioned as the dimension nears the row count (512: LDS 0.34,
1024: 0.16); below 100 the CPU projector fails (its block size).

Stages: ``featurize`` (extract), ``finalize_features`` (Φ(ΦᵀΦ)⁻¹: curvature),
``start_scoring_checkpoint`` + ``score`` + ``finalize_scores`` (score).
"""

from __future__ import annotations

import os

import torch
import trak
from common import Recorder, batches, build_model, load_problem, parse_args
from trak import TRAKer
from trak.projectors import BasicProjector, ProjectionType


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    model = build_model(problem["params"])
    train = batches(problem["train"], args.batch_size)
    query = batches(problem["query"], args.batch_size)
    proj_dim = args.options.get("proj_dim", 256)
    dtype = problem["params"]["0.weight"].dtype

    rec = Recorder()
    projector = BasicProjector(
        grad_dim=sum(p.numel() for p in model.parameters()),
        proj_dim=proj_dim,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device="cpu",
        dtype=dtype,
    )
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=len(problem["train"][1]),
        save_dir=os.path.join(args.workdir, "trak"),
        device="cpu",
        projector=projector,
        proj_dim=proj_dim,
        use_half_precision=False,
    )
    checkpoint = model.state_dict()
    with rec.stage("extract"):
        traker.load_checkpoint(checkpoint, model_id=0)
        for x, y in train:
            traker.featurize(batch=(x, y), num_samples=len(x))
    with rec.stage("curvature"):
        traker.finalize_features()
    with rec.stage("score"):
        traker.start_scoring_checkpoint(
            "query", checkpoint, model_id=0, num_targets=len(problem["query"][1])
        )
        for x, y in query:
            traker.score(batch=(x, y), num_samples=len(x))
        scores = torch.as_tensor(traker.finalize_scores(exp_name="query")).T  # [Q, N]
    rec.finish(args.result, scores, args.workdir, traker=trak.__version__, proj_dim=proj_dim)


if __name__ == "__main__":
    main()
