"""``torch.compile(fullgraph=True)`` around per_sample_grads gives the eager result (CPU).

Eager results are checked against a loop of torch.autograd.grad in test_grads.py. Inductor's
first compile in a process is slow (C++ kernels), so this file stays small.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from logix_func import per_sample_grads


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_compiled_mlp_equals_eager(chunk_size):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    params = dict(model.named_parameters())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))  # chunks of 3, 3 and 2
    compiled = torch.compile(
        lambda p, b: per_sample_grads(model, p, b, chunk_size=chunk_size), fullgraph=True
    )
    assert_same(compiled(params, (x, y)), per_sample_grads(model, params, (x, y)))


@dataclass
class LMOutput:
    logits: torch.Tensor


class BagOfWordsForCausalLM(nn.Module):
    """A causal LM without attention (running sum of embeddings): a small graph to compile."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask):
        h = (self.embed(input_ids) * attention_mask[..., None]).cumsum(1)
        return LMOutput(self.lm_head(self.norm(h)))


def test_compiled_dict_batch_language_model_equals_eager():
    torch._dynamo.reset()
    model = BagOfWordsForCausalLM()
    params = dict(model.named_parameters())
    mask = (torch.arange(6) < torch.tensor([6, 4, 2, 5])[:, None]).long()
    labels = torch.randint(1, 11, (4, 6)).masked_fill(mask == 0, -100)
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": mask, "labels": labels}
    compiled = torch.compile(lambda p, b: per_sample_grads(model, p, b), fullgraph=True)
    assert_same(compiled(params, batch), per_sample_grads(model, params, batch))
