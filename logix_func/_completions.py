"""Prompt/completion batches for causal language models: only the completion is scored.

Attributing generated text asks which training examples made the model write the completion
given the prompt, so a query's measurement is the loss of the completion tokens alone. With
labels equal to the token ids except ``-100`` on the prompt and the padding, the default loss of
``*ForCausalLM`` models (next-token cross-entropy summed over non-ignored tokens) is exactly
``-Σ_t log p(completion_t | prompt, completion_<t)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ._batch import IGNORE_INDEX


def completion_labels(
    input_ids: Int[Tensor, "batch tokens"],
    prompt_lengths: Int[Tensor, " batch"] | Sequence[int] | int,
    attention_mask: Int[Tensor, "batch tokens"] | None = None,
) -> Int[Tensor, "batch tokens"]:
    """``input_ids`` with ``-100`` on each sequence's prompt and padding.

    The prompt of sequence ``b`` is its first ``prompt_lengths[b]`` attended tokens (padding on
    either side); padding is where ``attention_mask`` is 0.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
            f"{tuple(input_ids.shape)}"
        )
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).broadcast_to(
        input_ids.shape[:1]
    )
    attended = attention_mask != 0
    if (lengths < 0).any() or (lengths >= attended.sum(1)).any():
        raise ValueError(
            f"prompt_lengths {lengths.tolist()} must leave at least one completion token in "
            f"each sequence (attended tokens: {attended.sum(1).tolist()})"
        )
    position = attended.long().cumsum(1) - 1  # index among the attended tokens
    prompt = position < lengths[:, None]
    return input_ids.masked_fill(prompt | ~attended, IGNORE_INDEX)


def prompt_completion_batch(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]
) -> dict[str, Tensor]:
    """A right-padded batch ``{"input_ids", "attention_mask", "labels"}`` of prompt + completion.

    The prompt is tokenized as the tokenizer does by default (special tokens such as BOS
    included) and the completion without special tokens; their ids are concatenated, so the
    prompt's tokens are the same as when the model generated the completion from it. Labels are
    :func:`completion_labels`: ``-100`` on the prompt and the padding.
    """
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists of strings")
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"need as many prompts as completions, at least one: {len(prompts)} prompts, "
            f"{len(completions)} completions"
        )
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    heads = [tokenizer(p)["input_ids"] for p in prompts]
    tails = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    if not all(tails):
        raise ValueError("every completion must have at least one token")
    length = max(len(h) + len(t) for h, t in zip(heads, tails, strict=True))
    ids = torch.full((len(heads), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (head, tail) in enumerate(zip(heads, tails, strict=True)):
        ids[b, : len(head) + len(tail)] = torch.tensor(head + tail)
        mask[b, : len(head) + len(tail)] = 1
    labels = completion_labels(ids, [len(h) for h in heads], mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
