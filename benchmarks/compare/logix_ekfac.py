"""LogIX's documented LoGra + EKFAC workflow, shared by the runners that use it; peers' python.

Over a ``LogIXScheduler(hessian="ekfac", save="grad")``: its first pass collects the
forward/backward covariances (curvature), its second logs and saves the per-sample gradients
while accumulating the EKFAC eigenvalues (extract; LogIX fuses the two); then the query log and
``compute_influence_all`` against the saved training logs (score).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def ekfac_scores(
    run,
    scheduler,
    model: torch.nn.Module,
    train: Iterable[tuple[Tensor, Tensor]],
    query: tuple[Tensor, Tensor],
    loss: Callable[[torch.nn.Module, Tensor, Tensor], Tensor],
    batch_size: int,
    stage,
) -> Tensor:
    """Scores ``[Q, N]``, columns in training order; ``loss(model, x, y)`` is the summed loss
    of a batch and ``stage(name)`` times each step (a ``Recorder.stage``)."""
    stage_of = ["curvature", "extract"]
    for epoch in scheduler:
        with stage(stage_of[epoch]):
            offset = 0
            for x, y in train:
                with run(data_id=list(range(offset, offset + len(x)))):
                    model.zero_grad(set_to_none=True)
                    loss(model, x, y).backward()
                offset += len(x)
            run.finalize()
    with stage("score"):
        run.eval()
        run.setup({"grad": ["log"]})
        x_query, y_query = query
        with run(data_id=[f"q{i}" for i in range(len(x_query))]):
            model.zero_grad(set_to_none=True)
            loss(model, x_query, y_query).backward()
        loader = run.build_log_dataloader(batch_size=batch_size)
        result = run.compute_influence_all(run.get_log(), loader)
        columns = torch.as_tensor([int(i) for i in result["tgt_ids"]])
        scores = torch.empty_like(result["influence"])
        scores[:, columns] = result["influence"]
    return scores
