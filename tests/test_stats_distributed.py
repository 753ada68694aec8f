"""``all_reduce`` across two real processes (gloo on CPU) against numpy on the union."""

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
for name, stat in [("variance", lf.running_variance()), ("covariance", lf.running_covariance())]:
    state = stat.init({k: v.shape[1:] for k, v in logs.items()})
    for start in range(0, len(logs["a"]), 16):
        state = stat.update(state, {k: v[start : start + 16] for k, v in logs.items()})
    torch.save(stat.finalize(stat.all_reduce(state)), f"{folder}/{name}{rank}.pt")
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
    for rank in range(2):
        for kind in ("variance", "covariance"):
            got = torch.load(tmp_path / f"{kind}{rank}.pt")
            for name in ("a", "b"):
                rows = torch.cat([s[name] for s in shards]).double().reshape(87, -1).numpy()
                cov = np.cov(rows.T, bias=True)
                want = cov if kind == "covariance" else np.diag(cov).reshape(got[name].shape)
                np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-6)
