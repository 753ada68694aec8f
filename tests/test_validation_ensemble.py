"""Past KFAC on the digits MLP (tests/data/lds_mlp.npz): the per-layer GGN and ensembles.

Public pieces only, full gradients, default damping. The GGN is
``fit_curvature(method="ggn")``; the ensemble averages the scores of three MLPs trained with
seeds 0, 1, 2 by the ground truth's own recipe (``digits.train_mlps``; seed 0 is the stored
model), each with its own rows, GGN and query rows. Figures in docs/ensembles.md
(``python -m benchmarks.ensemble``).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import logix_func as lf
from logix_func.demo import digits
from logix_func.pipeline import fit_curvature

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def scores():
    """``{name: [497, 1300] scores}`` and the ground truth."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = np.load(DATA / "lds_mlp.npz")
    split, model = digits.digits_split(), digits.mlp_model()
    stored = {k.removeprefix("param/"): torch.from_numpy(data[k]) for k in data.files if "/" in k}
    others = digits.train_mlps(split.train_x, split.train_y, [1, 2])
    models = [stored] + [{k: v[m] for k, v in others.items()} for m in range(2)]
    loader = list(zip(split.train_x.split(325), split.train_y.split(325), strict=True))
    members, queries, out = [], [], {}
    for seed, params in enumerate(models):
        spec = lf.logra(model, rank=None)
        train = lf.projected_grads(model, params, (split.train_x, split.train_y), spec)
        queries.append(lf.projected_grads(model, params, (split.test_x, split.test_y), spec))
        for method in ("ekfac", "ggn") if seed == 0 else ("ggn",):  # members: the GGN
            factors = fit_curvature(
                model, params, loader, spec, method=method, fisher="exact", progress=False
            )
            pre = lf.preconditioner(factors)
            out[f"{method} {seed}"] = lf.influence(queries[-1], train, preconditioner=pre)
        members.append(lf.Member(train, pre))
    out["ensemble"] = lf.ensemble_influence(queries, members)
    torch.set_num_threads(threads)
    lds = {
        k: lf.lds(v, data["masks"], data["outputs"], measurement="loss")[0] for k, v in out.items()
    }
    print("\n" + "  ".join(f"{k} {v:.3f}" for k, v in lds.items()))
    return lds


def test_the_per_layer_ggn_goes_past_ekfac(scores):
    assert scores["ggn 0"] >= 0.75
    assert scores["ggn 0"] >= scores["ekfac 0"] + 0.05


def test_an_ensemble_of_three_mlps_beats_each_member(scores):
    assert scores["ensemble"] >= 0.80
    assert scores["ensemble"] >= max(scores[f"ggn {s}"] for s in range(3)) + 0.01
