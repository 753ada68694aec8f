"""Kronfluence's EKFAC on the unseen MLP ground truth, over label-sampling seeds.

    PYTHONPATH=. .venv-peers/bin/python -m benchmarks.compare.kronfluence_seeds [--seeds 3]

The seed-0 model of ``tests/data/lds_deep_mlp.npz`` (digits MLP 64-128-128-10), Kronfluence's
documented workflow as in ``run_kronfluence.py`` (summed cross-entropy with labels sampled
from the model, batches of 325, ``damping_factor=None``), with ``torch.manual_seed(seed)``
before each run; prints the LDS of each draw (all 497 test points, 256 subsets × 5 seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from torch.utils.data import TensorDataset

import logix_func as lf
from benchmarks.compare.ekfac_factors import BATCH
from benchmarks.compare.kronfluence_ekfac import Classification, ekfac_scores
from benchmarks.lds_default import load

sys.path.insert(0, str(Path(__file__).parent))
from common import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/kronfluence_seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, params, split, masks, outputs, _ = load("tests/data/lds_deep_mlp.npz")
    train = TensorDataset(split.train_x, split.train_y)
    query = TensorDataset(split.test_x, split.test_y)
    values = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        task = Classification()
        model = prepare_model(build_model(dict(params)), task)
        analyzer = Analyzer(
            "ekfac", model, task, cpu=True, disable_tqdm=True, output_dir=f"{args.workdir}/{seed}"
        )
        scores = ekfac_scores(analyzer, train, query, BATCH)
        values.append(lf.lds(scores, masks, outputs)[0])
        print(f"seed {seed}: LDS {values[-1]:.3f}", flush=True)
    mean, sd = torch.tensor(values).mean().item(), torch.tensor(values).std(correction=0).item()
    print(f"Kronfluence EKFAC: LDS {mean:.3f} ± {sd:.3f} over {len(values)} label draws")


if __name__ == "__main__":
    main()
