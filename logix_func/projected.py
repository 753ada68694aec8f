"""projected_grads: LoGra-projected per-sample gradients from one batched pass, without hooks.

No per-sample gradient is ever formed, and the user's model is only *called*
(``torch.func.functional_call``). While the model runs, a ``TorchFunctionMode`` that lives for
that one call recognises the covered layers' ``F.linear`` / ``conv1d`` / ``conv2d`` /
``F.embedding`` calls by the identity of their weight tensor (the very tensors passed to
``functional_call``), records the call's projected input ``P_in a_t`` and adds a zero tensor
``e`` to its output. The gradient of the summed loss with respect to ``e`` is the per-token
``δ`` of each sample (samples do not interact in the batched pass), and
``Σ_t (P_out δ_t)(P_in a_t)ᵀ`` is the projected gradient. Two engines differentiate the ``e``'s:

* plain eager mode: ``torch.autograd.grad``, the ``e``'s being leaves created as the forward
  reaches each call (one forward, one backward without weight gradients);
* under ``torch.compile`` or a ``torch.func`` transform: ``torch.func.grad`` of a function of the
  ``e``'s, whose shapes come from a first forward pass (dead code once compiled).

Hugging Face's ``Conv1D`` (GPT-2) is a ``transposed_linear`` layer: its
``torch.addmm(bias, x.view(-1, in), weight)`` is recognised the same way, by the weight.

A weight shared by several projectable modules (tied input and output embeddings) is covered
once, under the spec's layer; every use adds its tokens to that layer's gradient, a use whose
layout is the transpose of the layer's (an ``nn.Linear`` head tied to an ``nn.Embedding``) with
the roles of its inputs and output gradients swapped, so the result is the gradient of the
shared parameter.

Precision: the projected tokens ``P_in a_t`` and ``P_out δ_t`` are computed in the dtype the model
runs in (the weight's, or autocast's); the sum over tokens is taken in float32 or wider
(``promote_types(weight dtype, float32)``, autocast disabled), which is the returned dtype.

``nn.MultiheadAttention`` runs its projections inside ``F.multi_head_attention_forward``, out of
a handler's sight, so that call is computed by :func:`~logix_func.layers.mha_forward` instead.
Any other use of a covered weight (a tied weight in a matmul, a parametrisation) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._compat import reparametrize_module, tree_map, under_transform
from .batch import LossFn, ModelBatch, sample_loss, summed_sample_losses
from .checks import check_modes, check_params, draws_random, random_error
from .grads import split_weights
from .layers import (
    Call,
    LayerSpec,
    backprop_tokens,
    describe,
    input_tokens,
    mha_forward,
    projectable_layers,
)
from .projection import ProjectionSpec
from .typing import Logs, ProjectedGrads
from .watching import watch

Tap = Callable[[str, Call, Tensor], Tensor]
# uses of a covered weight that only read its metadata (properties, then methods)
_METADATA = {"shape", "dtype", "device", "requires_grad", "is_leaf", "ndim", "layout", "names"}
_METADATA |= {"is_cuda", "is_sparse", "is_quantized", "is_meta", "is_nested", "grad_fn", "nbytes"}
_INSPECT = {"size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size"}
_INSPECT |= {"is_floating_point", "is_complex", "get_device", "__len__", "__hash__", "__format__"}


def projected_grads(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    spec: ProjectionSpec,
    *,
    loss_fn: LossFn | None = None,
    return_activations: bool = False,
    chunk_size: int | None = None,
) -> ProjectedGrads | tuple[ProjectedGrads, Logs]:
    """Projected per-sample gradients ``P_out G_i P_inᵀ`` of the spec's layers.

    Args:
        model: any ``nn.Module``; only called through ``functional_call``, never changed.
        params: ``{name: Tensor}``, values for some of ``model``'s parameters (the others are
            the model's own); they are held fixed.
        batch: ``(inputs, targets)`` or a dict with ``labels`` (see :mod:`logix_func.batch`).
        spec: a :class:`~logix_func.projection.ProjectionSpec` built for this model.
        loss_fn: ``loss_fn(outputs, targets)`` → scalar loss of one sample (batch of one);
            ``None`` = summed cross-entropy (or the model's token loss for dict batches).
        return_activations: also return per-token projected inputs and output gradients.
        chunk_size: samples per pass; bounds peak memory, same results.

    Returns:
        ``{layer: [B, k_out, k_in]}``; with ``return_activations`` a pair ``(grads, logs)``,
        ``logs = {layer: {"activations": [B, T, k_in], "backprops": [B, T, k_out],
        "mask": Bool[B, T]}}`` where padded tokens (``attention_mask`` of a dict batch, for
        layers whose tokens are the sequence) are masked out and zeroed.
    """
    if not isinstance(spec, ProjectionSpec):
        raise TypeError(f"spec must be a ProjectionSpec (from lf.logra), got {type(spec).__name__}")
    mb, weights = prepare(model, params, batch)
    layers = _covered_layers(model, spec, {**weights[0], **weights[1]})
    tied = _tied_uses(model, layers)
    run = _Pass(model, mb, weights, spec, layers, sample_loss(model, mb, loss_fn), tied)
    if chunk_size is None:
        return run(mb.tensors, mb.size, return_activations)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    parts = []
    for start in range(0, mb.size, chunk_size):
        rows = slice(start, min(start + chunk_size, mb.size))
        parts.append(run(_rows(mb.tensors, rows), rows.stop - rows.start, return_activations))
    return tree_map(lambda *xs: torch.cat(xs), *parts)


def prepare(
    model: nn.Module, params: Mapping[str, Tensor], batch: Any
) -> tuple[ModelBatch, tuple[dict, dict, dict]]:
    """Checked batch and ``(detached params, the model's other params, buffers)`` of a pass."""
    check_params(model, params)
    check_modes(model, None)
    mb = ModelBatch.from_batch(batch)
    fixed, buffers = split_weights(model, params)
    return mb, ({n: p.detach() for n, p in params.items()}, fixed, buffers)


def _rows(tensors: dict[str, Any], rows: slice) -> dict[str, Any]:
    return tree_map(lambda t: t[rows], tensors)


def _covered_layers(
    model: nn.Module, spec: ProjectionSpec, tensors: dict[str, Tensor]
) -> dict[str, tuple[LayerSpec, Tensor]]:
    """The spec's layers checked against ``model``, with the weight tensor each one will use."""
    modules = dict(model.named_modules())
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    every = dict(model.named_parameters(remove_duplicate=False))
    covered = {}
    for name, layer in spec.layers.items():
        if name not in modules:
            raise KeyError(
                f"spec layer {name!r} is not a module of {type(model).__name__}: "
                "was the spec built for another model?"
            )
        actual = describe(name, modules[name])
        if actual is None or not actual.same_layout(layer):
            raise ValueError(
                f"spec layer {name!r} is {_layout(layer)} but the model's module is "
                f"{_layout(actual)}: was the spec built for another model?"
            )
        covered[name] = (layer, tensors[canonical[id(every[layer.weight])]])
    return covered


def _tied_uses(
    model: nn.Module, layers: dict[str, tuple[LayerSpec, Tensor]]
) -> dict[str, tuple[str, LayerSpec, bool]]:
    """Other modules using a covered layer's weight: ``{module: (layer, its layout, swapped)}``.

    ``swapped``: the module's gradient layout is the transpose of the layer's. A tied module's
    own bias is a parameter of its own, not covered.
    """
    every = dict(model.named_parameters(remove_duplicate=False))
    owner_of: dict[int, str] = {}
    for name, (layer, _) in layers.items():
        first = owner_of.setdefault(id(every[layer.weight]), name)
        if first != name:
            raise ValueError(
                f"spec layers {first!r} and {name!r} share one weight (tied parameters): a spec "
                "lists a shared weight once, and every module using it adds to that layer's "
                "gradient; build the spec with logra(), which does this"
            )
    tied = {}
    for name, use in projectable_layers(model).items():
        owner = owner_of.get(id(every[use.weight]))
        if owner is None or name in layers:
            continue
        layer = layers[owner][0]
        swapped = use.weight_transposed != layer.weight_transposed
        sizes = (layer.out_features, layer.in_features)
        same = (use.in_features, use.out_features) == (sizes[::-1] if not swapped else sizes)
        token_kinds = {"linear", "transposed_linear", "embedding"}
        if not {use.kind, layer.kind} <= token_kinds or layer.bias is not None or not same:
            raise ValueError(
                f"module {name!r} shares the weight of covered layer {owner!r} "
                f"({_layout(layer)}), a tie projected_grads covers only between linear and "
                "embedding layers without bias on the covered one; exclude "
                f"{owner!r} from the spec (logra(..., layers=[...]))"
            )
        if use.kind == layer.kind:
            continue  # the same call as the layer's own, on the same weight: already its tokens
        ranks = (layer.rank_in, layer.rank_out) if swapped else (layer.rank_out, layer.rank_in)
        tied[name] = (owner, replace(use, bias=None).with_ranks(*ranks), swapped)
    return tied


def _layout(layer: LayerSpec | None) -> str:
    if layer is None:
        return "not projectable"
    bias = "with" if layer.bias else "without"
    groups = f", groups={layer.groups}" if layer.groups != 1 else ""
    return (
        f"a {layer.kind} {layer.in_features}→{layer.out_features} {bias} bias{groups} "
        f"(weight {layer.weight!r})"
    )


class _Pass:
    """One batched forward+backward of a (sub-)batch: per-token ``δ`` of every covered call."""

    def __init__(self, model, mb, weights, spec, layers, loss_of, tied=None):
        self.model, self.mb, self.weights = model, mb, weights
        self.layers, self.loss_of = layers, loss_of
        groups: dict[tuple, list[str]] = {}
        for name, (_, w) in layers.items():
            groups.setdefault((w.device, w.dtype), []).append(name)
        self.mats = {}
        for (device, dtype), names in groups.items():
            self.mats.update(spec.projectors(names, device, dtype))
        # every module whose calls add to a layer's gradient: (layer, layout, swapped roles)
        self.roles = {name: (name, False) for name in layers}
        self.uses = dict(layers)
        for use, (owner, layout, swapped) in (tied or {}).items():
            self.roles[use] = (owner, swapped)
            self.uses[use] = (layout, layers[owner][1])
            p_out, p_in = self.mats[owner]
            self.mats[use] = (p_in, p_out) if swapped else (p_out, p_in)

    def forward(self, tensors: dict[str, Any], batch: int, tap: Tap) -> Any:
        mode = _Intercept(self.uses, batch, tap)
        with mode:
            outputs = self.mb.call(self.model, self.weights, tensors)
        mode.check_all_called()
        return outputs

    def loss(self, outputs: Any, tensors: dict[str, Any]) -> Tensor:
        """Sum of the samples' losses, each computed on its own (batch of one)."""
        return summed_sample_losses(self.loss_of, outputs, tensors)

    def input_tap(self, inputs: dict[str, list[Tensor]], batch: int, add: Tap) -> Tap:
        """Records the call's projected inputs, then adds ``add(...)`` (a zero) to its output."""

        def tap(name: str, call: Call, y: Tensor) -> Tensor:
            inputs[name].append(input_tokens(self.uses[name][0], call, self.mats[name][1], batch))
            return y + add(name, call, y)

        return tap

    def deltas_autograd(self, tensors, batch) -> tuple[dict, dict]:
        """Plain eager mode: zeros ``e`` created as the forward reaches each call."""
        inputs = {name: [] for name in self.uses}
        es: dict[str, list[Tensor]] = {name: [] for name in self.uses}

        def zero_leaf(name: str, call: Call, y: Tensor) -> Tensor:
            _check_grad_enabled(name)
            # a broadcast view of a zero scalar: shaped like the output, no memory of its own
            es[name].append(y.new_zeros((), requires_grad=True).expand(y.shape))
            return es[name][-1]

        # the pass's weights stay in the model through the backward too: a non-reentrant
        # checkpointed block recomputes its forward there, and must see the same tensors
        merged = {k: v for part in self.weights for k, v in part.items()}
        in_place = reparametrize_module(self.model, merged, tie_weights=True)
        with torch.enable_grad(), in_place:
            outputs = self.forward(tensors, batch, self.input_tap(inputs, batch, zero_leaf))
            flat = [e for name in self.uses for e in es[name]]
            grads = torch.autograd.grad(
                self.loss(outputs, tensors), flat, allow_unused=True, materialize_grads=True
            )
        it = iter(grads)
        return {name: [next(it) for _ in es[name]] for name in self.uses}, inputs

    def deltas_functional(self, tensors, batch) -> tuple[dict, dict]:
        """Under torch.compile or a torch.func transform: ``torch.func.grad`` of the ``e``'s.

        Their shapes come from a forward without backward in which the covered outputs depend
        on a (zero) differentiated input, as in the real pass, so that the model takes the same
        code paths; under torch.compile that pass is dead code and costs nothing.
        """
        outs: dict[str, list[tuple]] = {name: [] for name in self.uses}

        def shape_pass(zero: Tensor) -> Tensor:
            def tap(name: str, call: Call, y: Tensor) -> Tensor:
                outs[name].append((y.shape, y.dtype, y.device))
                return y + zero

            self.forward(tensors, batch, tap)
            return zero

        torch.func.vjp(shape_pass, next(iter(self.layers.values()))[1].new_zeros(()))
        es = {  # broadcast views of zero scalars: no memory of their own
            name: tuple(torch.zeros((), dtype=t, device=d).expand(s) for s, t, d in outs[name])
            for name in self.uses
        }

        def total(es: dict[str, tuple[Tensor, ...]]) -> tuple[Tensor, dict]:
            inputs: dict[str, list[Tensor]] = {name: [] for name in self.uses}

            def next_zero(name: str, call: Call, y: Tensor) -> Tensor:
                _check_grad_enabled(name)
                i = len(inputs[name]) - 1
                if i >= len(es[name]) or es[name][i].shape != y.shape:
                    raise RuntimeError(
                        f"layer {name!r}: call {i} has output shape {tuple(y.shape)}, which the "
                        "shape pass did not see; the model's forward must not depend on values"
                    )
                return es[name][i]

            outputs = self.forward(tensors, batch, self.input_tap(inputs, batch, next_zero))
            return self.loss(outputs, tensors), inputs

        deltas, inputs = torch.func.grad(total, has_aux=True)(es)
        return deltas, inputs

    def __call__(self, tensors: dict[str, Any], batch: int, logs: bool) -> Any:
        run = self.deltas_functional if under_transform() else self.deltas_autograd
        try:
            deltas, inputs = run(tensors, batch)
        except RuntimeError as err:
            if "saved tensor hooks" not in str(err):
                raise
            raise RuntimeError(
                "the model uses non-reentrant gradient checkpointing (torch.utils.checkpoint), "
                "which torch.func transforms do not support; projected_grads uses them under "
                "torch.compile and inside vmap/grad. Call it eagerly, or disable checkpointing"
            ) from err
        mask = _token_mask(tensors)
        grads, records = {}, {}
        g_of = {name: [] for name in self.layers}
        v_of = {name: [] for name in self.layers}
        for use, (owner, swapped) in self.roles.items():
            layout, p_out = self.uses[use][0], self.mats[use][0]
            g = [backprop_tokens(layout, d, p_out, batch) for d in deltas[use]]
            g_of[owner] += inputs[use] if swapped else g
            v_of[owner] += g if swapped else inputs[use]
        for name, (layer, weight) in self.layers.items():
            g, v = g_of[name], v_of[name]
            acc = torch.promote_types(weight.dtype, torch.float32)
            with torch.autocast(weight.device.type, enabled=False):
                grads[name] = reduce(  # no ``sum``: its ``0 + first`` copies a whole term
                    torch.add,
                    (_token_sum(gc.to(acc), vc.to(acc)) for gc, vc in zip(g, v, strict=True)),
                )
            if logs:
                m = torch.cat([_call_mask(layer, mask, vc) for vc in v], dim=1)
                w = m.unsqueeze(-1).to(v[0].dtype)
                records[name] = {
                    "activations": torch.cat(v, dim=1) * w,
                    "backprops": torch.cat(g, dim=1) * w,
                    "mask": m,
                }
        return (grads, records) if logs else grads


def _token_sum(
    g: Float[Tensor, "batch tokens k_out"], v: Float[Tensor, "batch tokens k_in"]
) -> Float[Tensor, "batch k_out k_in"]:
    """``Σ_t g_t v_tᵀ`` per sample; one token is a broadcast product (a batched matmul of
    inner size 1 costs several times more)."""
    if g.shape[1] == 1:
        return g[:, 0, :, None] * v[:, 0, None, :]
    return torch.einsum("btk,btj->bkj", g, v)


def _check_grad_enabled(name: str) -> None:
    if not torch.is_grad_enabled():
        raise RuntimeError(
            f"covered layer {name!r} ran with gradients disabled inside the model's forward "
            "(torch.no_grad, or torch.utils.checkpoint with use_reentrant=True, whose forward runs "
            "without gradients): its gradient cannot be seen. Use non-reentrant checkpointing: "
            "checkpoint(..., use_reentrant=False), or {'use_reentrant': False} as a transformers "
            "model's activation_checkpointing_enable / gradient_checkpointing_enable kwargs"
        )


def _token_mask(tensors: dict[str, Any]) -> Tensor | None:
    mask = tensors["kwargs"].get("attention_mask")
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def _call_mask(layer: LayerSpec, mask: Tensor | None, v: Tensor) -> Bool[Tensor, "batch tokens"]:
    """The attention mask where this call's tokens are the sequence, else all True."""
    sequence = (
        mask is not None and not layer.kind.startswith("conv") and v.shape[1] == mask.shape[1]
    )
    if sequence:
        return mask
    return torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)


class _Intercept(TorchFunctionMode):
    """Routes the covered layers' calls through ``tap`` while the model runs."""

    def __init__(
        self,
        layers: dict[str, tuple[LayerSpec, Tensor]],
        batch: int,
        tap: Tap,
        on_watch: Callable[[str, Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.on_watch = on_watch  # receives the tensors passed to ``watch`` (capture only)
        self.by_call = {(layer.kind, id(w)): name for name, (layer, w) in layers.items()}
        self.covered = {id(w): name for name, (_, w) in layers.items()}
        self.calls = dict.fromkeys(layers, 0)
        self.kinds = {name: layer.kind for name, (layer, _) in layers.items()}
        self.batch, self.tap = batch, tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is watch and self.on_watch is not None:
            return self.on_watch(*args, **kwargs)
        if draws_random(func, args, kwargs):
            raise random_error(func)
        if func is F.multi_head_attention_forward and self.uses_covered(args, kwargs):
            return mha_forward(self.linear, lambda w: id(w) in self.covered, *args, **kwargs)
        if func is F.linear:
            return self.layer_call("linear", func, args, kwargs, _linear_call)
        if func is torch.conv1d or func is torch.conv2d:
            kind = "conv1d" if func is torch.conv1d else "conv2d"
            return self.layer_call(kind, func, args, kwargs, _conv_call)
        if func is F.embedding:
            return self.layer_call("embedding", func, args, kwargs, _embedding_call)
        if func is torch.addmm:
            return self.layer_call("transposed_linear", func, args, kwargs, self.addmm_call)
        if self.uses_covered(args, kwargs) and not _reads_metadata(func):
            self.refuse(func, args, kwargs)
        return func(*args, **kwargs)

    def layer_call(self, kind, func, args, kwargs, bind):
        weight, call = bind(*args, **kwargs)
        name = self.by_call.get((kind, id(weight)))
        if name is None:
            if self.uses_covered(args, kwargs):
                self.refuse(func, args, kwargs)
            return func(*args, **kwargs)
        return self.tapped(name, call, func(*args, **kwargs))

    def addmm_call(self, input, mat1, mat2, *, beta=1, alpha=1, out=None):
        """``torch.addmm(bias, x [rows, in], weight [in, out])`` of a ``transposed_linear``
        layer: the rows are the batch's tokens, batch-major."""
        name = self.by_call.get(("transposed_linear", id(mat2)))
        if name is not None:
            if beta != 1 or alpha != 1 or out is not None or mat1.shape[0] % self.batch:
                raise ValueError(
                    f"layer {name!r} (a transposed linear layer such as transformers' Conv1D) is "
                    f"called as torch.addmm with an input of shape {tuple(mat1.shape)}, "
                    f"beta={beta}, alpha={alpha}: projected_grads needs beta = alpha = 1 and "
                    f"input rows that are the batch's ({self.batch}) tokens, batch first"
                )
            mat1 = mat1.reshape(self.batch, -1, mat1.shape[-1])
        return mat2, Call(mat1, mat2.dtype)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear`` on batch-first inputs, tapped when ``weight`` is covered."""
        y = F.linear(x, weight, bias)
        name = self.by_call.get(("linear", id(weight)))
        return y if name is None else self.tapped(name, Call(x, weight.dtype), y)

    def tapped(self, name: str, call: Call, y: Tensor) -> Tensor:
        call, y = self.per_sample(name, call, y)
        self.calls[name] += 1
        return self.tap(name, call, y)

    def per_sample(self, name: str, call: Call, y: Tensor) -> tuple[Call, Tensor]:
        """The call seen batch first: an input shared by the samples is used once per sample.

        A shared input (position ids ``(T,)`` or ``[1, T]``, a ``(T, in)`` table) reaches every
        sample through broadcasting; its output is expanded to one copy per sample,
        ``[1, ...] → [B, ...]`` or ``(...) → [B, ...]``, the shape that broadcasting against
        the batch gives, so sample ``b``'s tokens are those of its own loss. An input whose first
        dimension is the batch size is taken as per-sample.
        """
        x, b = call.x, self.batch
        if x.dim() >= 1 and x.shape[0] == b:
            return call, y
        if x.dim() >= 1 and x.shape[0] == 1 and y.shape[:1] == (1,):
            return replace(call, x=x.expand(b, *x.shape[1:])), y.expand(b, *y.shape[1:])
        if call.kernel:  # a convolution: an unbatched input is (C, *spatial)
            unbatched = x.dim() == len(call.kernel) + 1
        else:  # the dimensions before the features (all of an embedding's indices)
            lead = x.shape if self.kinds[name] == "embedding" else x.shape[:-1]
            unbatched = b not in lead
        if not unbatched:
            raise ValueError(
                f"layer {name!r} received an input of shape {tuple(x.shape)} whose first "
                f"dimension is not the batch ({b}); projected_grads needs the covered layers to "
                "see the batch first (batch-first models), or an input shared by every sample "
                "with no batch dimension (position ids (T,) or [1, T])"
            )
        return replace(call, x=x.expand(b, *x.shape)), y.expand(b, *y.shape)

    def uses_covered(self, args, kwargs) -> bool:
        for a in (*args, *kwargs.values()):
            if isinstance(a, (tuple, list)):
                if any(id(b) in self.covered for b in a):
                    return True
            elif id(a) in self.covered:
                return True
        return False

    def refuse(self, func, args, kwargs):
        names = sorted(
            self.covered[id(a)] for a in (*args, *kwargs.values()) if id(a) in self.covered
        )
        what = getattr(func, "__qualname__", None) or repr(func)
        if getattr(func, "__name__", "") == "__get__":
            what = f"Tensor.{getattr(func.__self__, '__name__', '?')}"
        raise ValueError(
            f"the weight of covered layer(s) {names} is used by {what}, which projected_grads "
            "cannot project (only the layer's own linear/conv/embedding call is); its gradient "
            "would be incomplete. Exclude the layer from the spec (logra(..., layers=[...]))"
        )

    def check_all_called(self) -> None:
        missing = [name for name, n in self.calls.items() if n == 0]
        if missing:
            raise ValueError(
                f"covered layer(s) {missing} were never called with their own weight during the "
                "forward (unused, or their weight is used another way); exclude them from the spec"
            )


def _reads_metadata(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: its descriptor's name says which
        return getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA
    return name in _INSPECT


def _linear_call(input, weight, bias=None):
    return weight, Call(input, weight.dtype)


def _conv_call(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return weight, Call(input, weight.dtype, tuple(weight.shape[2:]), stride, padding, dilation)


def _embedding_call(
    input,
    weight,
    padding_idx=None,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
    sparse=False,
):
    if max_norm is not None or scale_grad_by_freq:
        raise ValueError(
            "F.embedding with max_norm or scale_grad_by_freq changes the weight or its gradient "
            "across the batch; such an embedding cannot be projected per sample"
        )
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return weight, Call(input, weight.dtype, padding_idx=padding_idx)
