"""What the Shakespeare runners share on top of ``benchmarks/compare/common.py``.

The runners are scripts run in their own process with ``PYTHONPATH`` holding the checkout root
and ``benchmarks/compare`` (the orchestrator sets both), the same command line as the digits
comparison's runners. The problem file holds ``{"params", "train": [N, T + 1],
"query": [Q, T + 1]}``: the reference weights and the character windows.
"""

from __future__ import annotations

import torch

from benchmarks.lm.shakespeare import GPT, as_batch


def build_model(params: dict[str, torch.Tensor]) -> GPT:
    model = GPT()
    model.load_state_dict(params)
    return model.eval()


def window_batches(windows: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(inputs [B, T], targets [B, T]), ...]`` in order."""
    return [as_batch(w) for w in windows.split(size)]
