"""One rank of the digits pipeline under torchrun (gloo, CPU), run by tests/test_distributed.py.

``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py FOLDER``:
reads ``FOLDER/setup.pt`` (params, data, spec), logs to ``FOLDER/store`` through a DDP
wrapper, fits curvature, scores and saves what each rank got as ``FOLDER/rank{r}.pt``.
With ``KILL_AFTER=n``, rank 1 of the first attempt commits ``n`` batches, appends one more and
kills itself with SIGKILL (torchrun then restarts the job when run with ``--max-restarts``).
"""

from __future__ import annotations

import copy
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf
from logix_func.demo.digits import mlp_model
from logix_func.pipeline import position_ids, store_schema


def main(folder: str) -> None:
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    rank = dist.get_rank()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    setup = torch.load(f"{folder}/setup.pt")
    model, params = mlp_model(dtype=torch.float32), setup["params"]
    model.load_state_dict(params)
    spec = lf.ProjectionSpec.from_dict(setup["spec"])
    loader = DataLoader(TensorDataset(setup["x"], setup["y"]), batch_size=setup["batch_size"])

    ddp = DistributedDataParallel(model)
    forwards = []
    ddp.register_forward_pre_hook(lambda *_: forwards.append(1))

    url = f"{folder}/store"
    store = lf.LogStore.create(url, store_schema(model, spec), writer=rank, exist_ok=True)
    resumed_from = len(store.committed_ids())
    kill_after = int(os.environ.get("KILL_AFTER", "-1"))
    batches = []

    def ids(batch, offset):  # the default ids; rank 1 of the first attempt dies midway
        batches.append(offset)
        if rank == 1 and attempt == 0 and kill_after >= 0:
            if len(batches) == kill_after + 1:
                store.flush()  # kill_after batches committed
            elif len(batches) == kill_after + 2:  # one more appended, not committed
                os.kill(os.getpid(), signal.SIGKILL)
        return position_ids(batch, offset)

    lf.log_dataset(ddp, params, loader, spec, store, ids=ids, progress=False, group=group)

    factors = {
        "ekfac": lf.fit_curvature(ddp, params, loader, spec, progress=False, group=group),
        # a plain iterable: every rank reads all batches and skips the others' ones
        "raw": lf.fit_curvature(
            model, params, list(loader), spec, method="raw", progress=False, group=group
        ),
        # rows gathered from the ranks, not summed
        "dual_ggn": lf.fit_curvature(
            model, params, loader, spec, method="dual_ggn", progress=False, group=group
        ),
    }

    reader = lf.LogStore.open(url)
    part = lf.distributed.store_part(reader, group)
    query = lf.projected_grads(model, params, (setup["qx"], setup["qy"]), spec)
    pre = lf.preconditioner(factors["ekfac"], damping=1e-3)
    scores = lf.influence(query, part, preconditioner=pre)
    part_ids = part.ids()

    sharded = fully_shard(copy.deepcopy(model))
    try:
        lf.log_dataset(sharded, params, loader, spec, f"{folder}/never", progress=False)
        fsdp_error = ""
    except TypeError as e:
        fsdp_error = str(e)

    errors = {}
    mismatched = lf.kfac().init(lf.logra(model, rank=4 + rank, seed=0))  # another spec per rank
    try:
        lf.distributed.all_reduce_state(mismatched, group)
    except ValueError as e:
        errors["specs"] = str(e)
    dual = lf.curvature.dual_ggn()
    dual_state = dual.init(lf.logra(model, rank=4 + rank, seed=0))
    try:
        lf.distributed.all_reduce_state(dual_state, group)
    except ValueError as e:
        errors["dual specs"] = str(e)
    shuffled = DataLoader(  # shuffling seeded per rank: the ranks draw different batches
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(rank),
    )
    try:
        next(lf.distributed.rank_batches(shuffled, group))
    except ValueError as e:
        errors["batches"] = str(e)

    torch.save(
        {
            "errors": errors,
            "factors": factors,
            "top": tuple(lf.distributed.gather_top_k(scores, 5, group=group, ids=part_ids)),
            "bottom": tuple(
                lf.distributed.gather_top_k(scores, 5, group=group, ids=part_ids, largest=False)
            ),
            "scores": lf.distributed.gather_scores(scores, group=group),
            "part_ids": part_ids,
            "ddp_forwards": len(forwards),
            "resumed_from": resumed_from,
            "fsdp_params": lf.distributed.full_params(sharded),
            "fsdp_error": fsdp_error,
        },
        f"{folder}/rank{rank}.pt",
    )
    dist.barrier()  # no rank leaves while another still waits on a collective
    dist.destroy_process_group()
    # Leave before main's locals (a DDP model among them) are freed: in torch 2.13 freeing a
    # DDP reducer joins gloo's worker thread while holding the GIL that thread may need, which
    # deadlocks or aborts ("terminate called without an active exception") under load. Every
    # result is written above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
