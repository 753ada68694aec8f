"""Cost of fitting KFAC and EKFAC on the digits MLP next to one epoch of plain forward+backward.

    python -m benchmarks.curvature [--repeats 5] [--batch-size 100] [--threads 1]

Every row is the median of ``--repeats`` timed runs after one warm-up; the methods take turns
round after round. "x epoch" is time / one epoch of plain forward+backward over the same 1,300
training images in the same batches (mean cross-entropy, one ``.backward()`` per batch).
KFAC is one pass of ``fisher_logs`` + ``kfac.update``; EKFAC adds a second pass for the
eigenvalue correction (what ``fit_curvature(method="ekfac")`` does).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf
from logix_func.demo.digits import digits_split, mlp_model, train_mlp

from .logra_models import interleaved_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = digits_split(torch.float32)
    model = mlp_model(dtype=torch.float32).eval()
    params = {k: v.float() for k, v in train_mlp(data.train_x, data.train_y, 0).items()}
    model.load_state_dict(params)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=args.batch_size)

    def epoch() -> None:
        for x, y in loader:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()

    cases: dict[str, Callable[[], object]] = {"plain epoch (fwd+bwd)": epoch}
    for rank in (None, 8):
        spec = lf.logra(model, rank=rank)
        label = "full" if rank is None else f"LoGra {rank}"
        for method in ("kfac", "ekfac"):
            for fisher in ("empirical", "true"):
                cases[f"{method.upper()} {fisher}, {label}"] = (
                    lambda spec=spec, method=method, fisher=fisher: lf.fit_curvature(
                        model, params, loader, spec, method=method, fisher=fisher, progress=False
                    )
                )
    times = interleaved_times(cases, args.repeats)
    base = statistics.median(times["plain epoch (fwd+bwd)"])
    print(f"digits MLP 64-32-10, 1300 images, batch {args.batch_size}, threads {args.threads}")
    print(f"{'case':32s} {'ms':>8s} {'x epoch':>8s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:32s} {1e3 * t:8.1f} {t / base:8.2f}")


if __name__ == "__main__":
    main()
