"""Batch and loss conventions shared by every per-sample function.

A batch is either ``(inputs, targets)`` — ``inputs`` a tensor or a tuple of tensors — or a
Hugging Face style dict whose ``labels`` entry holds the targets and whose other entries are the
model's keyword arguments. Every tensor leaf carries the batch on its first dimension.

The loss of one sample is a *sum* over its tokens. A user's ``loss_fn(outputs, targets)`` sees
one sample as a batch of one (outputs and targets keep a leading dimension of size 1), so an
ordinary ``F.cross_entropy(outputs, targets, reduction="sum")`` is a valid loss function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Shaped
from torch import Tensor, nn

from ._compat import tree_flatten, tree_map, tree_unflatten

IGNORE_INDEX = -100
LossFn = Callable[[Any, Tensor], Tensor]
BatchedTensor = Shaped[Tensor, "batch ..."]
Batch = (
    tuple[BatchedTensor | Sequence[BatchedTensor], BatchedTensor]
    | list[BatchedTensor | Sequence[BatchedTensor]]
    | Mapping[str, Any]
)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class ModelBatch:
    """A batch split into the model's call arguments and the targets.

    ``tensors`` holds every batched leaf (positional args under ``"args"``, keyword args under
    ``"kwargs"``, targets under ``"targets"``); ``static`` holds keyword arguments that are not
    tensors and are passed as they are.
    """

    tensors: dict[str, Any]
    static: dict[str, Any]
    size: int

    @classmethod
    def from_batch(cls, batch: Batch) -> ModelBatch:
        """Validate ``batch`` (all tensor leaves share a non-empty batch dimension) and split it."""
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                raise ValueError(
                    "a dict batch needs a 'labels' entry with the targets (Hugging Face style); "
                    f"got keys {sorted(batch)}"
                )
            kwargs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, Tensor)}
            static = {k: v for k, v in batch.items() if k != "labels" and not isinstance(v, Tensor)}
            tensors = {"args": (), "kwargs": kwargs, "targets": batch["labels"]}
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, targets = batch
            args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            tensors, static = {"args": args, "kwargs": {}, "targets": targets}, {}
        else:
            raise TypeError(
                "batch must be (inputs, targets) or a dict with 'labels'; "
                f"got {type(batch).__name__}"
            )
        return cls(tensors, static, _common_batch_size(tensors))

    def call(self, model: nn.Module, weights: tuple[dict[str, Tensor], ...], tensors=None) -> Any:
        """Run ``model`` functionally on ``tensors`` (default: the whole batch)."""
        t = self.tensors if tensors is None else tensors
        kwargs = {**t["kwargs"], **self.static}
        return torch.func.functional_call(model, weights, tuple(t["args"]), kwargs)


def _common_batch_size(tensors: dict[str, Any]) -> int:
    leaves = {}
    for i, a in enumerate(tensors["args"]):
        leaves[f"inputs[{i}]"] = a
    for k, v in tensors["kwargs"].items():
        leaves[k] = v
    leaves["targets"] = tensors["targets"]
    sizes = {}
    for name, leaf in leaves.items():
        if not isinstance(leaf, Tensor):
            raise TypeError(f"batch entry {name} must be a tensor, got {type(leaf).__name__}")
        if leaf.dim() == 0:
            raise ValueError(f"batch entry {name} is a scalar; every entry needs a batch dimension")
        sizes[name] = leaf.shape[0]
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"batch entries disagree on the batch size ({detail})")
    size = next(iter(sizes.values()))
    if size == 0:
        raise ValueError("the batch is empty (batch size 0)")
    return size


def unsqueeze_sample(tensors: Any) -> Any:
    """Give every tensor leaf of one sample a leading batch dimension of 1."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, tensors)


def summed_sample_losses(
    loss_of: Callable[[Any, dict[str, Any]], Tensor], outputs: Any, tensors: dict[str, Any]
) -> Float[Tensor, ""]:
    """``Σ_i loss_of(outputs_i, sample_i)`` of batched ``outputs``, each sample a batch of one.

    Non-tensor leaves of ``outputs`` (a Hugging Face ``past_key_values`` cache) are passed as
    they are; the outputs are flattened first so that containers that drop ``None`` fields when
    rebuilt (``ModelOutput``) keep their structure.
    """
    leaves, structure = tree_flatten(outputs)
    in_dims = [0 if isinstance(t, Tensor) else None for t in leaves]

    def one(leaves: list[Any], sample: dict[str, Any]) -> Tensor:
        out = tree_unflatten(leaves, structure)
        return loss_of(unsqueeze_sample(out), unsqueeze_sample(sample))

    return torch.func.vmap(one, in_dims=(in_dims, 0))(leaves, tensors).sum()


def logits_of(outputs: Any) -> Float[Tensor, "*shape"]:
    """The logits of a model's outputs: a tensor, a ``.logits`` attribute, or the first item."""
    if isinstance(outputs, Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    raise TypeError(f"cannot find logits in model outputs of type {type(outputs).__name__}")


def summed_loss(outputs: Any, targets: Shaped[Tensor, "*batch"]) -> Float[Tensor, ""]:
    """Default loss of one sample (or a batch), summed over samples and tokens.

    Integer targets: cross-entropy, tokens equal to -100 ignored; logits ``[..., C]`` against
    targets ``[...]``. Floating targets: half the summed squared error; outputs ``[...]`` (or
    ``[..., 1]``) against targets ``[...]``. Half-precision logits are summed in float32.
    """
    logits = logits_of(outputs)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if targets.is_floating_point():
        if logits.shape not in (targets.shape, targets.shape + (1,)):
            raise ValueError(
                f"default loss: outputs of shape {tuple(logits.shape)} do not match floating "
                f"targets of shape {tuple(targets.shape)}; pass loss_fn"
            )
        return 0.5 * (logits.reshape(targets.shape) - targets).pow(2).sum()
    if logits.dim() != targets.dim() + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"default loss: logits of shape {tuple(logits.shape)} do not match integer targets "
            f"of shape {tuple(targets.shape)} (expected logits [..., classes]); pass loss_fn"
        )
    # log_softmax + gather rather than F.cross_entropy: nll_loss has no vmap batching rule, and
    # its decomposition costs seconds on the first call of a process.
    targets = targets.flatten()
    keep = targets != IGNORE_INDEX
    picked = logits.flatten(0, -2).log_softmax(-1).gather(-1, targets.where(keep, 0)[:, None])
    return -torch.where(keep, picked[:, 0], 0.0).sum()


def is_causal_lm(model: nn.Module) -> bool:
    """Whether a Hugging Face model predicts the next token (its labels are shifted).

    Decided by the class name (``*ForCausalLM``, ``*LMHeadModel``), looking through
    ``torch.compile``'s wrapper.
    """
    return type(getattr(model, "_orig_mod", model)).__name__.endswith(_CAUSAL_SUFFIXES)


def lm_loss(shift: bool) -> Callable[[Any, Tensor, Tensor | None], Tensor]:
    """Token cross-entropy summed over non-ignored tokens, with an optional causal shift.

    ``loss(outputs, labels [b, t], attention_mask [b, t] | None)``: logits ``[b, t, vocab]``;
    with ``shift`` the logits at position ``i`` predict the label at ``i + 1``. Tokens where
    ``attention_mask`` is 0 are ignored as well. Labels of another shape than the mask (one
    label per sequence, say) are used as they are.
    """

    def loss(outputs: Any, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = logits_of(outputs)
        if attention_mask is not None and attention_mask.shape == labels.shape:
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if shift:  # labels move left; slicing the logits instead would copy them in backward
            labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
        return summed_loss(logits, labels)

    return loss


def sample_loss(
    model: nn.Module, batch: ModelBatch, loss_fn: LossFn | None
) -> Callable[[Any, dict[str, Any]], Tensor]:
    """``(outputs, sample) -> scalar loss`` of one sample seen as a batch of one.

    ``None`` picks :func:`summed_loss` for ``(inputs, targets)`` batches and, for dict batches,
    the model's own token loss as a sum (causal shift for ``*ForCausalLM`` models).
    """
    if loss_fn is None and not batch.tensors["args"]:  # a dict batch
        token_loss = lm_loss(is_causal_lm(model))

        def raw(outputs: Any, sample: dict[str, Any]) -> Tensor:
            mask = sample["kwargs"].get("attention_mask")
            return token_loss(outputs, sample["targets"], mask)
    else:
        fn = summed_loss if loss_fn is None else loss_fn

        def raw(outputs: Any, sample: dict[str, Any]) -> Tensor:
            return fn(outputs, sample["targets"])

    def checked(outputs: Any, sample: dict[str, Any]) -> Tensor:
        loss = raw(outputs, sample)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                "loss_fn must return the loss of one sample as a scalar (sum over its tokens); "
                f"got {shape}. Use reduction='sum'."
            )
        return loss.reshape(())

    return checked
