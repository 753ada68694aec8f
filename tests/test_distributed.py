"""Two torchrun ranks (gloo, CPU) against one process: the store, the curvature factors and the
scores agree, and a rank killed midway leaves a store that a restarted job completes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf
from logix_func.demo.digits import digits_split, mlp_model, train_mlp

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH, KILL_AFTER = 200, 16, 2
N_BATCHES = -(-N_TRAIN // BATCH)


def rank_ids(rank: int, batches: int = N_BATCHES) -> list[int]:
    """Data ids of the first ``batches`` batches of the loader that ``rank`` of two handles."""
    mine = range(rank, N_BATCHES, 2)[:batches]
    return [i for b in mine for i in range(b * BATCH, min((b + 1) * BATCH, N_TRAIN))]


def torchrun(script: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 150):
    # --standalone: the rendezvous takes a free port itself (a port picked here first could be
    # taken by another job's connections before torchrun binds it)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(script), *args]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, capture_output=True)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    data = digits_split(torch.float32)
    x, y = data.train_x[:N_TRAIN], data.train_y[:N_TRAIN]
    model = mlp_model(dtype=torch.float32)
    params = train_mlp(x, y, 0, steps=50)
    spec = lf.logra(model, rank=4, seed=0)
    setup = {
        "params": params,
        "spec": spec.to_dict(),
        "x": x,
        "y": y,
        "qx": data.test_x[:4],
        "qy": data.test_y[:4],
        "batch_size": BATCH,
    }
    torch.save(setup, folder / "setup.pt")
    return folder, setup, model, spec


def single_process(folder: Path, setup: dict, model, spec) -> dict:
    """The pipeline in this process over the same loader: the reference."""
    params = setup["params"]
    loader = DataLoader(TensorDataset(setup["x"], setup["y"]), batch_size=BATCH)
    store = lf.log_dataset(model, params, loader, spec, str(folder / "single"), progress=False)
    factors = {
        "ekfac": lf.fit_curvature(model, params, loader, spec, progress=False),
        "raw": lf.fit_curvature(model, params, loader, spec, method="raw", progress=False),
        "dual_ggn": lf.fit_curvature(
            model, params, loader, spec, method="dual_ggn", progress=False
        ),
    }
    query = lf.projected_grads(model, params, (setup["qx"], setup["qy"]), spec)
    scores = lf.influence(query, store, preconditioner=lf.preconditioner(factors["ekfac"], 1e-3))
    return {
        "store": store,
        "factors": factors,
        "scores": scores,
        "ids": store.ids(),
        "query": query,
    }


def assert_same_factors(got: dict, want: dict) -> None:
    for name, layer in want["layers"].items():
        for key, value in layer.items():
            mine = got["layers"][name][key]
            if key in ("QA", "QS", "Q"):  # eigenvectors: equal up to sign
                overlap = (mine.T.double() @ value.double()).abs()
                torch.testing.assert_close(
                    overlap, torch.eye(len(value)).double(), atol=1e-3, rtol=0
                )
            else:
                torch.testing.assert_close(mine, value, rtol=1e-4, atol=1e-6 * value.abs().max())


def test_two_ranks_equal_one_process_and_resume_after_a_kill(problem):
    folder, setup, model, spec = problem
    worker = ROOT / "tests" / "distributed_worker.py"

    killed = torchrun(worker, str(folder), env={"KILL_AFTER": str(KILL_AFTER)})
    assert killed.returncode != 0 and b"SIGKILL" in killed.stderr, killed.stderr.decode()[-3000:]
    assert not (folder / "rank0.pt").exists()
    partial = lf.LogStore.open(str(folder / "store"))
    partial_ids = partial.ids().tolist()
    assert len(set(partial_ids)) == len(partial_ids)  # no duplicates
    rank1_committed = set(rank_ids(1, KILL_AFTER))
    assert rank1_committed <= set(partial_ids) < set(range(N_TRAIN))

    resumed = torchrun(worker, str(folder))
    (folder / "resumed.log").write_bytes(resumed.stderr)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]

    ref = single_process(folder, setup, model, spec)
    store = lf.LogStore.open(str(folder / "store"))
    ids = store.ids()
    assert ids.tolist() == rank_ids(0) + rank_ids(1)  # writer 0's batches, then writer 1's
    got, want = store.read(ids), ref["store"].read(ids)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)

    order = torch.argsort(ref["ids"])[ids]  # reference columns in the distributed store's order
    for rank in range(2):
        result = torch.load(folder / f"rank{rank}.pt")
        assert result["resumed_from"] >= len(rank1_committed)  # the restart skipped these
        assert result["ddp_forwards"] == 0  # per-sample passes never called the DDP wrapper
        assert_same_factors(result["factors"]["ekfac"], ref["factors"]["ekfac"])
        assert_same_factors(result["factors"]["raw"], ref["factors"]["raw"])
        # the dual GGN's rows come in rank order: compare what they solve, not the rows
        dual, want_dual = result["factors"]["dual_ggn"], ref["factors"]["dual_ggn"]
        for name, layer in want_dual["layers"].items():
            for key, value in layer.items():
                assert dual["layers"][name][key].shape == value.shape
        got_solved = lf.preconditioner(dual)(ref["query"])
        for name, value in lf.preconditioner(want_dual)(ref["query"]).items():
            torch.testing.assert_close(got_solved[name], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["scores"], ref["scores"][:, order], rtol=1e-4, atol=1e-4)
        for key, largest in (("top", True), ("bottom", False)):
            want_top = lf.top_k(ref["scores"], 5, ids=ref["ids"], largest=largest)
            top = lf.TopK(*result[key])
            assert torch.equal(top.ids, want_top.ids)
            torch.testing.assert_close(top.values, want_top.values, rtol=1e-4, atol=1e-4)
        assert (
            result["part_ids"].tolist()
            == ids.tolist()[rank * N_TRAIN // 2 : (rank + 1) * N_TRAIN // 2]
        )
        for name, value in setup["params"].items():
            assert torch.equal(result["fsdp_params"][name], value)
        assert "fully_shard" in result["fsdp_error"] and "full_params" in result["fsdp_error"]
        assert "different projection specs" in result["errors"]["specs"]
        assert "different projection specs" in result["errors"]["dual specs"]
        assert "different batches" in result["errors"]["batches"]


def test_store_part_blocks_cover_the_store_in_order(tmp_path):
    schema = lf.StoreSchema(layers={"g": (3,)}, chunk_rows=4)
    url = str(tmp_path / "s")
    for writer, part in ((0, range(0, 10)), (1, range(10, 17))):  # two shards: 10 + 7 rows
        with lf.LogStore.create(url, schema, writer=writer, exist_ok=True) as store:
            store.append(list(part), {"g": torch.arange(len(part) * 3.0).view(-1, 3) + part[0]})
    store = lf.LogStore.open(url)
    everything = torch.cat([rows["g"] for _, rows in store.iter_chunks()])
    for start, stop in ((0, 17), (3, 12), (10, 10), (9, 11), (12, 17)):
        chunks = list(store.iter_chunks(chunk_rows=3, start=start, stop=stop))
        got = torch.cat([rows["g"] for _, rows in chunks]) if chunks else torch.zeros(0, 3)
        assert torch.equal(got, everything[start:stop])
        got_ids = torch.cat([i for i, _ in chunks]).tolist() if chunks else []
        assert got_ids == list(range(start, stop))
    with pytest.raises(IndexError, match="out of range"):
        store.iter_chunks(start=5, stop=18)


def test_gather_top_k_without_a_group_is_top_k():
    scores = torch.randn(3, 20)
    ids = torch.arange(100, 120)
    for largest in (True, False):
        got = lf.distributed.gather_top_k(scores, 4, group=None, ids=ids, largest=largest)
        want = lf.top_k(scores, 4, ids=ids, largest=largest)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.values, want.values)
    names = [f"row{i}" for i in range(20)]
    got = lf.distributed.gather_top_k(scores, 2, group=None, ids=names)
    assert got.ids == [[names[j] for j in row] for row in scores.topk(2, dim=1).indices.tolist()]
    with pytest.raises(ValueError, match="larger than the number"):
        lf.distributed.gather_top_k(scores, 21, group=None)


def test_example_runs_under_torchrun(tmp_path):
    script = ROOT / "examples" / "distributed_digits.py"
    run = torchrun(script, "--store", str(tmp_path / "store"), "--queries", "0", "--rank", "4")
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    out = run.stdout.decode()
    assert f"2 ranks, 1300 training rows at {tmp_path / 'store'}" in out
    assert out.count("proponents: #") == 1 and out.count("opponents: #") == 1


def test_rank_batches_alone_yields_every_batch_with_its_offset():
    data = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    for loader in (DataLoader(data, batch_size=4), list(DataLoader(data, batch_size=4))):
        got = [
            (i, offset, batch[1].tolist())
            for i, offset, batch in lf.distributed.rank_batches(loader, None)
        ]
        assert got == [(0, 0, [0, 1, 2, 3]), (1, 4, [4, 5, 6, 7]), (2, 8, [8, 9])]
