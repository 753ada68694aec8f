"""The ``logix-func`` command: the end-to-end attribution demo on scikit-learn's digits."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .grads import per_sample_grads


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: ``[1797, 64]`` pixels in [0, 1] and ``[1797]`` labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="logix-func", description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = load_digits_tensors()
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        opt.step()
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.flatten(1) for g in grads.values()], dim=1)

    train_g = flat(per_sample_grads(model, params, (train_x, train_y), chunk_size=500))
    query_g = flat(per_sample_grads(model, params, (test_x[:3], test_y[:3])))
    scores = query_g @ train_g.T
    for q, row in enumerate(scores):
        top = row.topk(5)
        best = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        pairs = ", ".join(f"{i}:{v:.3g}" for i, v in best)
        print(f"test {1500 + q} (label {test_y[q].item()}): top proponents {pairs}")


if __name__ == "__main__":
    main()
