"""Data-parallel attribution on scikit-learn's digits with torchrun.

    torchrun --nproc_per_node=2 examples/distributed_digits.py --store runs/digits-ddp

Every rank trains the same MLP (deterministic on CPU; rank 0's weights are broadcast anyway),
logs the LoGra gradients of its share of the training batches to one shared store, takes part
in the EKFAC fit (states summed over ranks), scores its block of the store's rows against the
test queries, and rank 0 prints the merged top-k. NCCL on GPUs, gloo on CPU. Rerunning after a
crash resumes the logging where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf
from logix_func.demo.cli import print_attributions
from logix_func.demo.digits import digits_split, mlp_model, train_mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="shared path or tensorstore URL")
    parser.add_argument("--rank", type=int, default=16, help="LoGra rank per side")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    group = dist.group.WORLD
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    data = digits_split(torch.float32)
    params = train_mlp(data.train_x, data.train_y, seed=0)
    params = lf.broadcast_state({k: v.to(device) for k, v in params.items()}, group)
    model = mlp_model(dtype=torch.float32).to(device).eval()
    model.load_state_dict(params)
    ddp = DistributedDataParallel(model)  # how training code holds it; unwrapped for attribution

    spec = lf.logra(model, rank=args.rank, seed=0)
    train = TensorDataset(data.train_x.to(device), data.train_y.to(device))
    loader = DataLoader(train, batch_size=args.batch_size)  # the same batches on every rank
    store = lf.log_dataset(ddp, params, loader, spec, args.store, progress=False, group=group)
    factors = lf.fit_curvature(
        ddp, params, loader, spec, method="ekfac", progress=rank == 0, group=group
    )
    pre = lf.preconditioner(factors)

    queries = torch.tensor(args.queries)
    query_batch = (data.test_x[queries].to(device), data.test_y[queries].to(device))
    query = lf.projected_grads(model, params, query_batch, spec)
    part = lf.store_part(store, group)  # this rank's block of rows
    scores = lf.influence(query, part, preconditioner=pre)  # [Q, rows of this rank]
    helps = lf.gather_top_k(scores, args.top, group=group, ids=part.ids())
    hurts = lf.gather_top_k(scores, args.top, group=group, ids=part.ids(), largest=False)

    if rank == 0:
        print(f"{dist.get_world_size()} ranks, {len(store)} training rows at {store.url}")
        print_attributions(data, args.queries, helps, hurts)
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13 with gloo can hang or abort when the DDP model is freed at exit (see
    # docs/distributed.md): leave now, everything is printed and the store is flushed.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
