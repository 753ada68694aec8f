"""dattri 0.3.0 on the Shakespeare GPT: its TRAK, EK-FAC or Arnoldi attributor; run with the
peers' python.

One ``AttributionTask`` whose loss of a window batch (``torch.func`` style, ``(params, data)``)
is the mean over windows of the summed token cross-entropy; dattri takes per-sample gradients
of it under ``vmap`` (one window at a time) and, for EK-FAC, runs it on whole batches.

* ``{"method": "trak", "proj_dim": 512}``: ``TRAKAttributor`` with one checkpoint over every
  parameter, its random projection, ``correct_probability_func`` = the geometric mean of the
  window's next-character probabilities, ``exp(-mean token loss)``.
* ``{"method": "ekfac", "damping": 0.01}``: ``IFAttributorEKFAC`` over every ``nn.Linear``
  (its default; the embeddings are not covered), the empirical Fisher of the training loss.
* ``{"method": "arnoldi", "proj_dim": 100}``: ``IFAttributorArnoldi``, the top eigenvectors of
  the Hessian of the training loss over every parameter.

Stages: ``cache`` (curvature; TRAK's cache is also its training-gradient pass), ``attribute``
(score: per-sample training and query gradients and their products, so extract is empty).
dattri's scores are ``[N, Q]``; they are written as ``[Q, N]``.
"""

from __future__ import annotations

from importlib.metadata import version

import torch
import torch.nn.functional as F
from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorEKFAC
from dattri.algorithm.trak import TRAKAttributor
from dattri.task import AttributionTask
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.compare.common import Recorder, load_problem, parse_args
from benchmarks.lm.problem import build_model


def main() -> None:
    args = parse_args()
    problem = load_problem(args.problem)
    model = build_model(problem["params"])
    method = args.options.get("method", "trak")

    def window_loss(params, data):
        (w,) = data
        batched = w if w.dim() == 2 else w[None]
        logits = functional_call(model, params, (batched[:, :-1],))
        token = F.cross_entropy(logits.transpose(1, 2), batched[:, 1:], reduction="none")
        return token.sum(-1).mean()

    def correct_probability(params, data):
        return torch.exp(-window_loss(params, data) / (data[0].shape[-1] - 1))

    train = DataLoader(TensorDataset(problem["train"]), batch_size=args.batch_size)
    query = DataLoader(TensorDataset(problem["query"]), batch_size=args.batch_size)
    rec = Recorder()
    task = AttributionTask(loss_func=window_loss, model=model, checkpoints=model.state_dict())
    if method == "trak":
        attributor = TRAKAttributor(
            task=task,
            correct_probability_func=correct_probability,
            projector_kwargs={"proj_dim": args.options.get("proj_dim", 512), "device": "cpu"},
            device="cpu",
        )
    elif method == "ekfac":
        attributor = IFAttributorEKFAC(task=task, damping=args.options.get("damping", 0.01))
    elif method == "arnoldi":
        attributor = IFAttributorArnoldi(
            task=task,
            proj_dim=args.options.get("proj_dim", 100),
            regularization=args.options.get("damping", 0.01),
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    with rec.stage("curvature"):
        attributor.cache(train)
    with rec.stage("score"):
        if method == "trak":
            scores = attributor.attribute(query)
        else:
            scores = attributor.attribute(train, query)
    rec.finish(args.result, scores.T, args.workdir, dattri=version("dattri"), method=method)


if __name__ == "__main__":
    main()
