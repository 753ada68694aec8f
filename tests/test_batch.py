"""Batch and loss conventions, checked against losses written out by hand."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from logix_func._batch import (
    IGNORE_INDEX,
    ModelBatch,
    is_causal_lm,
    lm_loss,
    logits_of,
    sample_loss,
    summed_loss,
    unsqueeze_sample,
)


def nll(logits, label):
    """-log softmax(logits)[label] of one position, in plain Python floats."""
    z = [float(v) for v in logits]
    return math.log(sum(math.exp(v) for v in z)) - z[label]


def test_from_batch_splits_tuple_batches():
    x, z, y = torch.zeros(3, 2), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long)
    mb = ModelBatch.from_batch(((x, z), y))
    assert mb.size == 3 and mb.static == {}
    assert (
        mb.tensors["args"] == (x, z) and mb.tensors["kwargs"] == {} and mb.tensors["targets"] is y
    )
    assert ModelBatch.from_batch([x, y]).tensors["args"] == (x,)


def test_from_batch_splits_dict_batches_and_passes_static_entries():
    ids, y = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    mb = ModelBatch.from_batch({"input_ids": ids, "labels": y, "use_cache": False})
    assert mb.size == 2 and mb.static == {"use_cache": False}
    assert mb.tensors["args"] == () and mb.tensors["kwargs"] == {"input_ids": ids}

    class Echo(nn.Module):
        def forward(self, input_ids, use_cache=True):
            return input_ids.float() + (10 if use_cache else 20)

    out = mb.call(Echo(), ({}, {}, {}))
    assert torch.equal(out, torch.full((2, 4), 20.0))


def test_from_batch_refuses_scalars_and_non_tensors():
    with pytest.raises(ValueError, match=r"targets is a scalar"):
        ModelBatch.from_batch((torch.zeros(2, 3), torch.tensor(1)))
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a tensor, got list"):
        ModelBatch.from_batch(((torch.zeros(2, 3), [1, 2]), torch.zeros(2)))


def test_summed_loss_integer_targets_sums_and_ignores_minus_100():
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    labels = torch.tensor([[1, IGNORE_INDEX, 3], [0, 2, IGNORE_INDEX]])
    want = sum(
        nll(logits[b, t], int(labels[b, t]))
        for b in range(2)
        for t in range(3)
        if labels[b, t] != IGNORE_INDEX
    )
    got = summed_loss(logits, labels)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_summed_loss_float_targets_is_half_the_squared_error():
    out, y = torch.randn(4, 1), torch.randn(4)
    want = 0.5 * sum((float(out[i, 0]) - float(y[i])) ** 2 for i in range(4))
    assert summed_loss(out, y).item() == pytest.approx(want, rel=1e-5)
    assert summed_loss(out[:, 0], y).item() == pytest.approx(want, rel=1e-5)


def test_summed_loss_upcasts_half_precision_only():
    logits, labels = torch.randn(3, 5), torch.tensor([0, 4, 2])
    assert summed_loss(logits.bfloat16(), labels).dtype == torch.float32
    assert summed_loss(logits.double(), labels).dtype == torch.float64


def test_logits_of_outputs():
    t = torch.zeros(2)
    assert (
        logits_of(t) is t and logits_of(SimpleNamespace(logits=t)) is t and logits_of((t, 1)) is t
    )
    with pytest.raises(TypeError, match=r"cannot find logits"):
        logits_of(3)


def test_lm_loss_shift_and_attention_mask():
    logits = torch.randn(1, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[2, 4, IGNORE_INDEX, 1]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last token is padding (its label 1 is not counted)
    # shifted: position t predicts label t + 1 -> (0 -> 4) counts, (1 -> -100), (2 -> masked)
    assert lm_loss(True)(logits, labels, mask).item() == pytest.approx(nll(logits[0, 0], 4))
    # not shifted: position t predicts label t -> (0 -> 2), (1 -> 4)
    want = nll(logits[0, 0], 2) + nll(logits[0, 1], 4)
    assert lm_loss(False)(logits, labels, mask).item() == pytest.approx(want)
    assert lm_loss(False)(logits, labels).item() == pytest.approx(want + nll(logits[0, 3], 1))


def test_lm_loss_with_one_label_per_sequence_ignores_the_token_mask():
    logits, label = torch.randn(1, 3, dtype=torch.float64), torch.tensor([2])
    mask = torch.tensor([[1, 1, 0, 0]])
    assert lm_loss(False)(logits, label, mask).item() == pytest.approx(nll(logits[0], 2))


def test_is_causal_lm_by_class_name():
    class GPT2LMHeadModel(nn.Linear):
        pass

    class TinyForCausalLM(nn.Linear):
        pass

    class TinyForSequenceClassification(nn.Linear):
        pass

    assert is_causal_lm(GPT2LMHeadModel(1, 1)) and is_causal_lm(TinyForCausalLM(1, 1))
    assert is_causal_lm(torch.compile(TinyForCausalLM(1, 1)))
    assert not is_causal_lm(TinyForSequenceClassification(1, 1))


def test_sample_loss_picks_the_token_loss_for_dict_batches():
    class TinyForCausalLM(nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids, 5).double())

    model = TinyForCausalLM()
    sample = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    mb = ModelBatch.from_batch({**sample, "labels": sample["input_ids"]})
    tensors = {"args": (), "kwargs": sample, "targets": sample["input_ids"]}
    loss = sample_loss(model, mb, None)(mb.call(model, ({}, {}, {}), tensors), tensors)
    logits = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 5).double()
    assert loss.item() == pytest.approx(nll(logits[0], 2))  # the masked token 3 is not counted


def test_unsqueeze_sample():
    tensors = {
        "args": (torch.zeros(3),),
        "kwargs": {"m": torch.zeros(2, 2)},
        "targets": torch.tensor(1),
    }
    shapes = torch.utils._pytree.tree_map(lambda t: tuple(t.shape), unsqueeze_sample(tensors))
    assert shapes == {"args": ((1, 3),), "kwargs": {"m": (1, 2, 2)}, "targets": (1,)}
