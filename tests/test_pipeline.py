"""The pipeline over a loader, and the main job end to end."""

import re

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf
from logix_func.demo.cli import main
from logix_func.pipeline import EKFAC_SEED_OFFSET, fit_curvature, log_dataset


def small_problem():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    x, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    return model, dict(model.named_parameters()), x, y


def test_log_dataset_stores_every_row_once_and_resumes(tmp_path):
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=3, seed=2)
    url = str(tmp_path / "train")
    first_part = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=7)
    log_dataset(model, params, first_part, spec, url, progress=False).close()
    # a rerun over the whole data skips the 20 committed rows and adds the other 30
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    store = log_dataset(model, params, loader, spec, url, progress=False)
    rows = store.read(list(range(50)))
    assert len(store) == 50 and sorted(torch.as_tensor(store.ids()).tolist()) == list(range(50))
    want = lf.projected_grads(model, params, (x, y), spec)
    for name, v in want.items():
        torch.testing.assert_close(rows[name], v, rtol=1e-5, atol=1e-6)


def test_log_dataset_refuses_a_store_of_another_projection(tmp_path):
    model, params, x, y = small_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=25)
    url = str(tmp_path / "train")
    log_dataset(model, params, loader, lf.logra(model, rank=3, seed=0), url, progress=False)
    try:
        log_dataset(model, params, loader, lf.logra(model, rank=3, seed=1), url, progress=False)
    except ValueError as err:  # the schema differs: the store names what
        assert "spec" in str(err)
    else:
        raise AssertionError("a store of another projection was accepted")


def test_fit_curvature_equals_the_transforms_by_hand():
    model, params, x, y = small_problem()
    spec = lf.logra(model, rank=None)
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    got = fit_curvature(model, params, loader, spec, fisher="true", seed=5, progress=False)
    k = lf.kfac("true")
    state = k.init(spec)
    batches = list(loader)
    for i, b in enumerate(batches):
        state = k.update(
            state, lf.fisher_logs(model, params, b, spec, fisher="true", seed=5 + i)[1]
        )
    e = lf.ekfac(k.finalize(state))
    est = e.init()
    for i, b in enumerate(batches):
        draw = 5 + i + EKFAC_SEED_OFFSET  # the eigenvalue pass draws its own labels
        est = e.update(est, lf.fisher_logs(model, params, b, spec, fisher="true", seed=draw)[0])
    want = e.finalize(est)
    kfac_draw = lf.sample_targets(model, params, batches[0], seed=5)[1]
    ekfac_draw = lf.sample_targets(model, params, batches[0], seed=5 + EKFAC_SEED_OFFSET)[1]
    assert not torch.equal(kfac_draw, ekfac_draw)  # independent draws in the two passes
    for name, f in want["layers"].items():
        for key, v in f.items():
            torch.testing.assert_close(got["layers"][name][key], v)


def test_main_job_runs_end_to_end_and_resumes(tmp_path, capsys):
    run = str(tmp_path / "digits")
    args = ["--run", run, "--rank", "4", "--queries", "0", "1", "--top", "3", "--no-progress"]
    args += ["--preconditioner", "ekfac"]
    main(args)
    out = capsys.readouterr().out
    assert "store: 1300 training rows" in out and "proponents:" in out and "opponents:" in out
    assert (tmp_path / "digits" / "influence.png").stat().st_size > 10_000
    main(args)  # every stage reuses what the run folder holds
    assert capsys.readouterr().out.splitlines()[3:] == out.splitlines()[3:]
    main([*args, "--seed", "1"])  # other weights and projection: nothing stale is reused
    other = capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert [f for f in files if f.startswith("model-")] == ["model-seed0.pt", "model-seed1.pt"]
    assert len([f for f in files if f.startswith("train-")]) == 2
    assert len([f for f in files if f.startswith("curvature-ekfac-")]) == 2
    assert len([f for f in files if f.startswith("test-")]) == 2
    assert other.splitlines()[3:] != out.splitlines()[3:]


def test_log_dataset_twice_into_one_store_url(tmp_path):
    """A URL's store is closed at the end, so its writer id is free for the next call."""
    model, params, x, y = small_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    spec, url = lf.logra(model, rank=2), str(tmp_path / "twice")
    first = log_dataset(model, params, loader, spec, url, progress=False)
    again = log_dataset(model, params, loader, spec, url, progress=False)
    assert len(again) == len(first) and again.committed_ids() == first.committed_ids()


def test_progress_bars_know_their_totals(capsys):
    model, params, x, y = small_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=20)  # 3 batches
    spec = lf.logra(model, rank=2)
    store = log_dataset(model, params, loader, spec, "memory://bars/train", progress=True)
    fit_curvature(model, params, loader, spec, method="ekfac", progress=True)
    lf.query_grads(model, params, loader, spec, progress=True)
    lf.self_influence(store, progress=True)
    bars = re.split(r"[\r\n]+", capsys.readouterr().err)
    for name, done in [
        ("logging", 3),
        ("KFAC", 3),
        ("EKFAC", 3),
        ("queries", 3),
        ("self-influence", 50),
    ]:
        assert any(re.match(rf"{name}: 100%\|.*\| {done}/{done} ", bar) for bar in bars), (
            name,
            bars,
        )
