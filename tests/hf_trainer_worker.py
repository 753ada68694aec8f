"""One rank of a Hugging Face Trainer under torchrun (gloo, CPU), run by
tests/test_hf_trainer_distributed.py.

``python -m torch.distributed.run --nproc_per_node=2 tests/hf_trainer_worker.py FOLDER``: trains
the tiny Llama of tests/test_hf_trainer.py for two DDP steps, then runs the attribution methods
with the default store URL (``FOLDER/out/attribution/weights-<fingerprint>``). Rank 0 saves the
trained weights as ``FOLDER/weights.pt``; each rank tries a store URL of its own (refused) and
saves what it got as ``FOLDER/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_hf_trainer import QUERIES, TRAIN, tiny_llama, training_args  # noqa: E402
from transformers import Trainer  # noqa: E402

from logix_func.integrations.huggingface import Attribution, AttributionArguments  # noqa: E402

OPTIONS = {"rank": 4, "method": "ekfac", "damping": 1e-3, "batch_size": 4, "progress": False}


def main(folder: str) -> None:
    torch.set_num_threads(1)
    args = training_args(f"{folder}/out", steps=2)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TRAIN)
    trainer.train()
    rank = dist.get_rank()
    if rank == 0:
        torch.save(trainer.model.state_dict(), f"{folder}/weights.pt")

    attribution = Attribution(trainer, AttributionArguments(**OPTIONS))
    store = attribution.extract_log()
    result = {
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "url": attribution.store_url,
        "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "store_ids": store.ids(),
        "scores": attribution.influence(QUERIES),
        "self": attribution.self_influence(),
        "top": tuple(attribution.top_k(QUERIES, k=3)),
        "train_ids": attribution.train_ids(),
        "url_error": "",
    }
    apart = AttributionArguments(**{**OPTIONS, "store": f"{folder}/rank{rank}-store"})
    try:  # a store URL that differs between the ranks
        Attribution(trainer, apart).extract_log()
    except ValueError as e:
        result["url_error"] = str(e)
    torch.save(result, f"{folder}/rank{rank}.pt")
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
