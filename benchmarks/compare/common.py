"""What every runner of the comparison shares; torch, numpy and the standard library only.

Each runner is a script run in its own process (ours with the project's python, the peers with
the peers' virtualenv python):

    python RUNNER.py PROBLEM.pt WORKDIR RESULT.json [--threads 1] [--batch-size 325]
        [--options JSON]

It loads the problem written by the orchestrator (model weights, train and query data), runs
its tool's pipeline with WORKDIR as the only place it persists anything, and writes the scores
``[Q, N]`` (``RESULT.npy``, positive = the training example helps the query) and a JSON record:
the wall time of each stage, the peak resident memory and the bytes left in WORKDIR.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("problem")
    parser.add_argument("workdir")
    parser.add_argument("result")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=325)
    parser.add_argument("--options", default="{}", help="tool options as JSON")
    args = parser.parse_args()
    args.options = json.loads(args.options)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def build_model(params: dict[str, torch.Tensor]) -> nn.Sequential:
    """The problem's model with ``params`` loaded: ``Linear`` layers named ``0``, ``2``, … with
    ``Tanh`` between them (the digits MLPs), or a single ``Linear`` (the logistic regression,
    wrapped so that every tool sees a named layer); a layer has a bias where ``params`` do."""
    dtype = params["0.weight"].dtype
    layers: list[nn.Module] = []
    for i in range(0, 2 * sum(k.endswith(".weight") for k in params), 2):
        out_features, in_features = params[f"{i}.weight"].shape
        layers += [nn.Linear(in_features, out_features, bias=f"{i}.bias" in params), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    model.load_state_dict(params)
    return model.eval()


def load_problem(path: str) -> dict:
    """``{"params", "train": (x, y), "query": (x, y), "name"}`` as written by the orchestrator."""
    return torch.load(path, weights_only=True)


def batches(data: tuple[torch.Tensor, torch.Tensor], size: int) -> list:
    x, y = data
    return list(zip(x.split(size), y.split(size), strict=True))


def logix_func_scores(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    train: list,
    query: list,
    spec,
    workdir: str,
    rec: Recorder,
    **fit_options,
) -> torch.Tensor:
    """logix_func's pipeline, timed in ``rec``'s stages: ``log_dataset`` of ``train`` to a store
    in ``workdir`` (extract); ``fit_curvature(**fit_options)`` saved there (curvature); the
    query rows, ``preconditioner(factors)`` and ``influence`` over the store (score).
    Returns ``[Q, N]`` scores with columns in training position order."""
    import logix_func as lf
    from logix_func.pipeline import fit_curvature, log_dataset

    with rec.stage("extract"):
        store = log_dataset(
            model,
            params,
            train,
            spec,
            os.path.join(workdir, "train"),
            progress=False,
            ids=lambda batch, offset: lf.index_ids(offset, len(batch[1])),  # training positions
        )
    with rec.stage("curvature"):
        factors = fit_curvature(model, params, train, spec, progress=False, **fit_options)
        lf.save_state(factors, os.path.join(workdir, "factors.pt"))
    with rec.stage("score"):
        pre = lf.preconditioner(factors)
        query_rows = {k: v.float() for k, v in lf.query_grads(model, params, query, spec).items()}
        scores = lf.influence(query_rows, store, preconditioner=pre)
        ordered = torch.empty_like(scores)
        ordered[:, torch.as_tensor(store.ids())] = scores  # columns by training position
    return ordered


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Recorder:
    """Stage wall times (and CPU times of the whole process) and memory of one pipeline run.

    Memory: the kernel's resident-set high-water mark (VmHWM), reset when the pipeline starts
    (after imports and data loading), so ``peak_mib`` is the largest resident size *during* the
    pipeline and ``peak_extra_mib`` that minus the resident size at its start.

    Every tool's imports are moved out of the garbage collector's sight (``gc.freeze``) when
    the pipeline starts: otherwise a full collection that scans torch's import graph (~0.08 s
    here) lands in whichever stage happens to trigger it, a large share of these short runs.
    """

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        gc.collect()
        gc.freeze()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base_kib = _status_kib("VmRSS")
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def finish(self, result: str, scores: torch.Tensor | np.ndarray, workdir: str, **extra):
        total = time.perf_counter() - self.start
        peak = _status_kib("VmHWM")
        scores = np.asarray(torch.as_tensor(scores).detach().to(torch.float64).numpy())
        np.save(Path(result).with_suffix(".npy"), scores)
        record = {
            "stages_s": self.stages,
            "stages_cpu_s": self.cpu,
            "total_s": total,
            "peak_mib": peak / 1024,
            "peak_extra_mib": (peak - self.base_kib) / 1024,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "disk_bytes": disk_bytes(workdir),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **extra,
        }
        Path(result).write_text(json.dumps(record, indent=1))


def disk_bytes(root: str) -> int:
    """Bytes of every file under ``root`` (apparent sizes)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total
