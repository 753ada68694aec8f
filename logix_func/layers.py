"""Which modules LoGra can project, and the token view of their gradients.

A covered layer's gradient is a matrix ``G [out, in']`` that is a sum over *tokens* of outer
products ``δ_t a_tᵀ``: ``a_t`` is the layer's input seen by token ``t`` (``in' = in + 1`` when
the layer has a bias: a column of ones is appended to every input, so ``[W | b]`` is one matrix)
and ``δ_t`` is the gradient of the loss with respect to the layer's output at that token.

* ``linear``: ``nn.Linear`` (and the packed ``in_proj_weight`` of ``nn.MultiheadAttention``),
  input ``[B, *, in]``; tokens are the flattened middle dimensions (1 for ``[B, in]``).
* ``conv1d`` / ``conv2d``: ``in = C_in/groups · kernel size``, inputs are the unfolded patches
  (channel-major, as ``weight.flatten(1)``); tokens are the output positions. With ``groups > 1``
  every (group, position) pair is a token whose ``δ`` is zero outside the group's channels.
* ``transposed_linear``: a linear layer that stores its weight as ``[in, out]`` and computes
  ``torch.addmm(bias, x.view(-1, in), weight)`` (``transformers.pytorch_utils.Conv1D`` of GPT-2,
  recognised by class name and layout without importing transformers). ``G`` is the gradient of
  ``weightᵀ`` (``[out, in]``, as for ``nn.Linear``), so ``G [:, :in] = weight.gradᵀ``. The rows of
  ``x.view(-1, in)`` are taken as batch-major (a batch-first input), which is what Conv1D does.
* ``embedding``: ``weight [num, dim]`` is seen as a linear layer with ``out = dim``,
  ``in = num`` and one-hot inputs, so ``G`` is the *transpose* of ``weight.grad``; tokens equal to
  ``padding_idx`` have no gradient and are left out.

The functions below turn a call's input into projected input tokens ``P_in a_t``
(``[B, T, k_in]``) and an output gradient into projected backprops ``P_out δ_t``
(``[B, T, k_out]``), in the same token order. A projector ``None`` stands for the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("linear", "conv1d", "conv2d", "embedding", "transposed_linear")
TRANSPOSED_KINDS = ("embedding", "transposed_linear")  # weight stored [in, out]


@dataclass(frozen=True)
class LayerSpec:
    """One covered layer: gradient layout ``[out, in (+1 bias)]`` and projection ranks."""

    kind: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    rank_in: int
    rank_out: int
    groups: int = 1

    @property
    def in_size(self) -> int:
        """Columns of the gradient matrix: inputs plus the bias column."""
        return self.in_features + (self.bias is not None)

    @property
    def weight_transposed(self) -> bool:
        """Whether the weight is stored ``[in, out]``, the transpose of the gradient layout."""
        return self.kind in TRANSPOSED_KINDS

    def with_ranks(self, rank_out: int, rank_in: int) -> LayerSpec:
        return replace(self, rank_out=rank_out, rank_in=rank_in)

    def same_layout(self, other: LayerSpec) -> bool:
        """Same kind, parameters and sizes (ranks aside)."""
        return self.with_ranks(0, 0) == other.with_ranks(0, 0)


@dataclass(frozen=True)
class Call:
    """One call of a covered layer: its input and the call options that shape its tokens."""

    x: Tensor
    dtype: torch.dtype
    kernel: tuple[int, ...] = ()
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    padding_idx: int | None = None


def describe(prefix: str, module: nn.Module) -> LayerSpec | None:
    """The layout of a projectable module (full ranks), or None if it is not projectable."""
    weight = f"{prefix}.weight" if prefix else "weight"
    bias = getattr(module, "bias", None)
    bias_name = (f"{prefix}.bias" if prefix else "bias") if isinstance(bias, nn.Parameter) else None
    if isinstance(module, nn.MultiheadAttention):
        if not isinstance(module.in_proj_weight, nn.Parameter):
            return None  # separate q/k/v weights (kdim/vdim differ): only out_proj is covered
        name = f"{prefix}.in_proj_" if prefix else "in_proj_"
        has_bias = isinstance(module.in_proj_bias, nn.Parameter)
        out, e = module.in_proj_weight.shape
        return _full(
            LayerSpec("linear", name + "weight", name + "bias" if has_bias else None, e, out, 0, 0)
        )
    if not isinstance(getattr(module, "weight", None), nn.Parameter):
        return None  # no weight, or a parametrised one (computed on every access)
    w = module.weight
    if isinstance(module, nn.Linear):
        return _full(LayerSpec("linear", weight, bias_name, w.shape[1], w.shape[0], 0, 0))
    if is_transposed_linear(module):
        spec = LayerSpec("transposed_linear", weight, bias_name, w.shape[0], w.shape[1], 0, 0)
        return _full(spec)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
        spec = LayerSpec(kind, weight, bias_name, math.prod(w.shape[1:]), w.shape[0], 0, 0)
        return _full(replace(spec, groups=module.groups))
    if (
        isinstance(module, nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
    ):
        return _full(LayerSpec("embedding", weight, None, w.shape[0], w.shape[1], 0, 0))
    return None


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D``: weight ``[nx, nf]``, bias ``[nf]``."""
    cls = type(module)
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers.")
        and isinstance(w, Tensor)
        and w.shape == (getattr(module, "nx", None), getattr(module, "nf", None))
        and isinstance(b, Tensor)
        and b.shape == (w.shape[1],)
    )


def _full(spec: LayerSpec) -> LayerSpec:
    return spec.with_ranks(spec.out_features, spec.in_size)


def projectable_layers(model: nn.Module) -> dict[str, LayerSpec]:
    """Every projectable module of ``model`` by name, with full ranks."""
    found = {}
    for name, module in model.named_modules():
        spec = describe(name, module)
        if spec is not None:
            found[name] = spec
    return found


def why_not_projectable(module: nn.Module) -> str:
    """A short reason for an error message."""
    if isinstance(module, nn.Embedding):
        return "an Embedding with max_norm or scale_grad_by_freq (both change the weight gradient)"
    if hasattr(module, "parametrizations"):
        return "a parametrised module (its weight is recomputed on every access)"
    supported = (
        "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.MultiheadAttention and "
        "transformers' Conv1D"
    )
    return f"a {type(module).__name__}; projectable modules are {supported}"


# ---------------------------------------------------------------------------------------------
# token views


def input_tokens(layer: LayerSpec, call: Call, p_in: Tensor | None, batch: int) -> Tensor:
    """Projected inputs ``P_in a_t`` (bias column included): ``[B, T, k_in]``."""
    x = call.x.detach()
    if layer.kind == "embedding":
        idx = x.reshape(batch, -1)
        v = F.one_hot(idx, layer.in_features).to(call.dtype) if p_in is None else p_in.T[idx]
        if call.padding_idx is not None:
            v = v * (idx != call.padding_idx).unsqueeze(-1).to(v.dtype)
        return v
    if layer.kind in ("linear", "transposed_linear"):
        x = x.reshape(batch, -1, layer.in_features)
        if p_in is None:
            if layer.bias is None:
                return x
            return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
        v = x @ p_in[:, : layer.in_features].T
        return v + p_in[:, layer.in_features] if layer.bias is not None else v
    # convolutions: P_in applied to every patch is a convolution with P_in as kernel
    g = layer.groups
    k_in = layer.rank_in
    if p_in is None:
        p_in = torch.eye(layer.in_size, dtype=x.dtype, device=x.device)
    kernel = p_in[:, : layer.in_features].reshape((k_in, -1) + call.kernel)
    kernel = kernel.repeat((g,) + (1,) * (kernel.dim() - 1))  # the same P_in for every group
    conv = F.conv1d if layer.kind == "conv1d" else F.conv2d
    v = conv(x, kernel, None, call.stride, call.padding, call.dilation, g)  # [B, g·k_in, *pos]
    v = v.reshape(batch, g, k_in, -1).transpose(2, 3).reshape(batch, -1, k_in)
    return v + p_in[:, layer.in_features] if layer.bias is not None else v


def backprop_tokens(layer: LayerSpec, grad: Tensor, p_out: Tensor | None, batch: int) -> Tensor:
    """Projected output gradients ``P_out δ_t``: ``[B, T, k_out]`` in the token order of
    :func:`input_tokens`."""
    if layer.kind in ("linear", "transposed_linear", "embedding"):
        d = grad.reshape(batch, -1, layer.out_features)
        return d if p_out is None else d @ p_out.T
    g, c = layer.groups, layer.out_features // layer.groups
    if p_out is None:
        p_out = torch.eye(layer.out_features, dtype=grad.dtype, device=grad.device)
    d = grad.reshape(batch, g, c, -1)  # [B, g, C_out/g, positions]
    blocks = p_out.reshape(-1, g, c)  # [k_out, g, C_out/g]
    return torch.einsum("bgcp,kgc->bgpk", d, blocks).reshape(batch, -1, layer.rank_out)


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention: F.multi_head_attention_forward calls F.linear internally, where a
# torch-function handler cannot see it. This is the same computation, batch-first, with the
# in- and out-projections routed through ``linear(x [B, T, in], weight, bias)``.

_MHA_UNSUPPORTED = ("bias_k", "bias_v", "static_k", "static_v")


def mha_forward(
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    covered: Callable[[Tensor], bool],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` for batched inputs ``[T, B, E]``, common options.

    ``linear`` computes (and taps) a projection of batch-first inputs; ``covered(weight)`` says
    whether a weight belongs to a covered layer.
    """
    options = dict(bias_k=bias_k, bias_v=bias_v, static_k=static_k, static_v=static_v)
    used = [k for k in _MHA_UNSUPPORTED if options[k] is not None]
    used += ["add_zero_attn"] if add_zero_attn else []
    if used or query.dim() != 3:
        what = ", ".join(used) if used else "unbatched inputs"
        raise NotImplementedError(
            f"projected_grads covers nn.MultiheadAttention without {what}; exclude its "
            "in_proj and out_proj from the spec (logra(..., layers=[...]))"
        )
    if training and dropout_p > 0:
        raise ValueError(
            "an nn.MultiheadAttention with dropout is in training mode: results would be random. "
            "Call model.eval() first."
        )
    q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [B, T, E]
    e = embed_dim_to_check
    if use_separate_proj_weight:
        b = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        ws = (q_proj_weight, k_proj_weight, v_proj_weight)
        q, k, v = (F.linear(t, w, bb) for t, w, bb in zip((q, k, v), ws, b, strict=True))
    elif query is key and key is value:
        q, k, v = linear(q, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    elif covered(in_proj_weight):
        raise NotImplementedError(
            "the packed in_proj of an nn.MultiheadAttention used for cross-attention (query, "
            "key, value not one tensor) is three linear maps with different inputs, not one "
            "projectable layer; exclude it from the spec (logra(..., layers=[...]))"
        )
    else:
        b = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(t, w, bb)
            for t, w, bb in zip((q, k, v), in_proj_weight.chunk(3), b, strict=True)
        )
    batch, tgt, src, hd = q.shape[0], q.shape[1], k.shape[1], e // num_heads
    q, k, v = (t.reshape(batch, -1, num_heads, hd).transpose(1, 2) for t in (q, k, v))
    bias = _attention_bias(attn_mask, key_padding_mask, batch, num_heads, tgt, src, q.dtype)
    if need_weights:
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        weights = None
    out = linear(out.transpose(1, 2).reshape(batch, tgt, e), out_proj_weight, out_proj_bias)
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    return out.transpose(0, 1), weights


def _attention_bias(attn_mask, key_padding_mask, batch, heads, tgt, src, dtype) -> Tensor | None:
    """Additive ``[B or 1, H or 1, T, S]`` bias from MHA's masks (bool: True = masked out)."""
    bias = None
    if attn_mask is not None:
        m = _additive(attn_mask, dtype)
        bias = m.reshape(1, 1, tgt, src) if m.dim() == 2 else m.reshape(batch, heads, tgt, src)
    if key_padding_mask is not None:
        m = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, src)
        bias = m if bias is None else bias + m
    return bias


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return zeros.masked_fill(mask, float("-inf"))
    return mask.to(dtype)
