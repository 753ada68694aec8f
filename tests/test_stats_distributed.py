"""``all_reduce`` and ``all_reduce_state`` across two real processes (gloo on CPU) against
numpy on the union."""

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, torch, torch.distributed as dist
import logix_func as lf
rank, folder = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
logs = torch.load(f"{folder}/shard{rank}.pt")
stats = {"variance": lf.running_variance(), "covariance": lf.running_covariance()}
for name, stat in stats.items():
    for empty0 in (False, True):  # rank 0 without rows: its zero state must not matter
        state = stat.init({k: v.shape[1:] for k, v in logs.items()})
        mask = torch.full((len(logs["a"]),), not (empty0 and rank == 0))
        for start in range(0, len(logs["a"]), 16):
            chunk = {k: v[start : start + 16] for k, v in logs.items()}
            state = stat.update(state, chunk, mask[start : start + 16])
        result = stat.finalize(stat.all_reduce(state))
        # the same reduction
        via = stat.finalize(lf.distributed.all_reduce_state(state, dist.group.WORLD))
        assert all(torch.equal(via[k], result[k]) for k in result)
        torch.save(result, f"{folder}/{name}{'-empty0' * empty0}{rank}.pt")
dist.destroy_process_group()
"""


def test_all_reduce_two_processes_matches_numpy(tmp_path):
    shards = [
        {"a": torch.randn(50, 3) + 1e4, "b": torch.randn(50, 2, 2)},
        {"a": torch.randn(37, 3) * 2 + 1e4 + 5, "b": torch.randn(37, 2, 2) - 1},
    ]
    for rank, logs in enumerate(shards):
        torch.save(logs, tmp_path / f"shard{rank}.pt")
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(tmp_path)], cwd=ROOT)
        for rank in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for rank, kind, empty0 in itertools.product(range(2), ("variance", "covariance"), (0, 1)):
        got = torch.load(tmp_path / f"{kind}{'-empty0' * empty0}{rank}.pt")
        for name in ("a", "b"):
            rows = torch.cat([s[name] for s in shards[empty0:]]).double()
            rows = rows.reshape(len(rows), -1).numpy()
            cov = np.cov(rows.T, bias=True)
            want = cov if kind == "covariance" else np.diag(cov).reshape(got[name].shape)
            scale = np.abs(want).max()  # float32 inputs: 1e-6 of the largest entry
            np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-6, atol=1e-6 * scale)
