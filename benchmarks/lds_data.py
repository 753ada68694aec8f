"""A digits-MLP LDS ground truth as the benchmarks use it: model, split, full-data models, LDS.

Two layouts are read:

* ``tests/data/lds_mlp.npz`` (``param/NAME``): one full-data model (seed 0) on the reference
  split; the models of seeds 1, 2, … are trained here with the same recipe
  (``digits.train_mlps``, which reproduces seed 0's stored weights).
* files with ``param{k}/NAME`` (``k`` = seed) and ``loss_per_seed [S, K, Q]``: the full-data
  models are stored; the split is ``digits.digits_split`` with the permutation seed
  ``split_seed``, in the stored models' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import logix_func as lf
from logix_func.demo import digits


@dataclass
class GroundTruth:
    model: nn.Module
    params: list[dict[str, torch.Tensor]]
    split: Any
    masks: np.ndarray
    outputs: np.ndarray
    describe: str

    def lds(self, scores: torch.Tensor) -> float:
        return float(lf.lds(scores, self.masks, self.outputs, measurement="loss")[0])


def _mlp(params: dict[str, torch.Tensor]) -> nn.Sequential:
    """``Linear → Tanh → … → Linear`` with the stored parameters' shapes (names ``0``, ``2``…)."""
    count = len(params) // 2
    layers: list[nn.Module] = []
    for i in range(count):
        out, fan_in = params[f"{2 * i}.weight"].shape
        layers += [nn.Linear(fan_in, out, dtype=params[f"{2 * i}.weight"].dtype), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _split(seed: int, dtype: torch.dtype) -> digits.DigitsSplit:
    """``digits.digits_split`` with another permutation seed (first `N_TRAIN` rows train)."""
    x, y = digits.load_digits_tensors(dtype)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    train, test = order[: digits.N_TRAIN], order[digits.N_TRAIN :]
    return digits.DigitsSplit(x[train], y[train], x[test], y[test], train, test)


def load_ground_truth(path: str, members: int = 1) -> GroundTruth:
    """The ground truth at ``path`` with the full-data models of seeds ``0 .. members-1``."""
    data = np.load(path)
    if "param/0.weight" in data.files:
        split = digits.digits_split()
        first = {
            k.removeprefix("param/"): torch.from_numpy(data[k]) for k in data.files if "/" in k
        }
        params = [first]
        if members > 1:
            stacked = digits.train_mlps(split.train_x, split.train_y, list(range(1, members)))
            params += [{k: v[m] for k, v in stacked.items()} for m in range(members - 1)]
        outputs = data["outputs"]
    else:
        stored = sorted({int(k.split("/")[0][len("param") :]) for k in data.files if "/" in k})
        if members > len(stored):
            raise ValueError(f"{path} stores {len(stored)} full-data models, {members} asked")
        params = [
            {
                k.split("/", 1)[1]: torch.from_numpy(data[k])
                for k in data.files
                if k.startswith(f"param{s}/")
            }
            for s in stored[:members]
        ]
        outputs = data["loss_per_seed"].mean(axis=1)
        split = _split(int(data["split_seed"]), params[0]["0.weight"].dtype)
    masks = data["masks"]
    describe = f"{masks.shape[0]} subsets, {outputs.shape[1]} test points, model " + "-".join(
        str(s) for s in [64] + [p.shape[0] for k, p in params[0].items() if "weight" in k]
    )
    return GroundTruth(_mlp(params[0]), params, split, masks, outputs, describe)
