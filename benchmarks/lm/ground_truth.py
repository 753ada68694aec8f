"""LDS ground truth for the Shakespeare benchmark: retraining on half subsets.

Trains the reference model (``shakespeare.train`` on all ``N_TRAIN`` windows, seed 0): the
weights every pipeline attributes. Then draws ``N_SUBSETS`` random half subsets (exactly N/2
windows each), retrains on each with seeds ``SEEDS`` (the same initialisations and minibatch
generators for every subset) and records each query's loss, the sum of its token losses over
the window: ``outputs_per_seed[s, seed, q]``. A loss falls when training data helps, so use
``lds(..., measurement="loss")`` with the seeds' mean.

Resumable in parts: each call with ``--part i --parts P`` trains the chunks ``i, i + P, ...``
(``CHUNK`` subsets × seeds per chunk, one ``vmap``-ed training) and writes each to
``--work``; finished chunks are skipped. ``--merge`` writes the compact result and prints the
split-half Spearman ``r`` of the two seeds' outputs (mean over queries), the reliability of
their mean ``2r / (1 + r)`` (Spearman-Brown) and the noise ceiling ``√reliability``: the LDS a
perfect attribution would reach against that mean.

The committed ``ground_truth.npz`` took 33 min wall-clock in two processes with one thread each
on 2 CPU cores shared with other jobs (load 5–9), 63 min summed over its chunks: 129 models of
300 AdamW steps (the reference model and 64 × 2 retrainings).

    nohup python -m benchmarks.lm.ground_truth --part 0 --parts 2 &
    nohup python -m benchmarks.lm.ground_truth --part 1 --parts 2 &
    python -m benchmarks.lm.ground_truth --merge   # benchmarks/lm/ground_truth.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.lm import shakespeare as sh
from logix_func.metrics import spearman

N_TRAIN, N_QUERY, N_SUBSETS, SEEDS, CHUNK, SUBSET_SEED = 3000, 300, 64, (0, 1), 4, 0
HERE = Path(__file__).resolve().parent


def subset_masks(n: int = N_TRAIN, count: int = N_SUBSETS) -> np.ndarray:
    """``[count, n]`` boolean masks, each with exactly ``n // 2`` entries set."""
    rng = np.random.default_rng(SUBSET_SEED)
    masks = np.zeros((count, n), dtype=bool)
    for row in masks:
        row[rng.permutation(n)[: n // 2]] = True
    return masks


def query_losses(params: dict, query: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return sh.window_losses(sh.GPT(), params, query).numpy()


def run_part(part: int, parts: int, work: Path) -> None:
    train, query = sh.windows(N_TRAIN, N_QUERY)
    masks = torch.from_numpy(subset_masks())
    if part == 0 and not (work / "full.pt").exists():
        start = time.perf_counter()
        params = sh.unstack(sh.train(train, torch.ones(1, N_TRAIN, dtype=torch.bool), [0]), 0)
        torch.save({"params": params, "seconds": time.perf_counter() - start}, work / "full.pt")
    for c in range(part, N_SUBSETS // CHUNK, parts):
        path = work / f"chunk{c:03d}.npz"
        if path.exists():
            continue
        start = time.perf_counter()
        rows = masks[c * CHUNK : (c + 1) * CHUNK]
        stacked = sh.train(train, rows.repeat_interleave(len(SEEDS), 0), list(SEEDS) * CHUNK)
        out = np.stack(
            [query_losses(sh.unstack(stacked, m), query) for m in range(len(rows) * len(SEEDS))]
        )
        seconds = time.perf_counter() - start
        np.savez(path, outputs=out.reshape(len(rows), len(SEEDS), -1), seconds=seconds)
        print(f"chunk {c}: {seconds:.0f} s", flush=True)


def merge(work: Path, out: Path) -> None:
    done = [c for c in range(N_SUBSETS // CHUNK) if (work / f"chunk{c:03d}.npz").exists()]
    chunks = [np.load(work / f"chunk{c:03d}.npz") for c in done]
    per_seed = np.concatenate([c["outputs"] for c in chunks])  # [S, seeds, Q]
    rows = np.concatenate([np.arange(c * CHUNK, (c + 1) * CHUNK) for c in done])
    full = torch.load(work / "full.pt", weights_only=True)
    _, query = sh.windows(N_TRAIN, N_QUERY)
    seconds = float(sum(c["seconds"] for c in chunks) + full["seconds"])
    half = spearman(torch.from_numpy(per_seed[:, 0].T), torch.from_numpy(per_seed[:, 1].T))
    r = float(half.nanmean())
    reliability = 2 * r / (1 + r)  # Spearman-Brown: the two seeds' mean against its own repeat
    ceiling = reliability**0.5  # the best correlation any prediction can reach with that mean
    np.savez_compressed(
        out,
        masks=subset_masks()[rows],
        seeds=np.array(SEEDS),
        outputs=per_seed.mean(1).astype(np.float32),
        outputs_per_seed=per_seed.astype(np.float32),
        query_loss=query_losses(full["params"], query),
        train_seconds=seconds,
        split_half=r,
        reliability=reliability,
        noise_ceiling=ceiling,
        **{f"param/{k}": v.numpy() for k, v in full["params"].items()},
    )
    print(
        json.dumps(
            {
                "split_half_spearman": r,
                "reliability": reliability,
                "noise_ceiling": ceiling,
                "training_seconds_summed_over_chunks": seconds,
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--work", default=str(HERE / "ground_truth_parts"))
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--out", default=str(HERE / "ground_truth.npz"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(work, Path(args.out))
    else:
        run_part(args.part, args.parts, work)


if __name__ == "__main__":
    main()
