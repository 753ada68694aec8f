"""The engine: tapping covered layers' outputs in one batched pass, and their output gradients.

The user's model is only *called* (``torch.func.functional_call``), never changed, and no hook
is registered. While the model runs, :class:`Intercept`, a ``TorchFunctionMode`` that lives for
that one call, recognises the covered layers' ``F.linear`` / ``conv1d`` / ``conv2d`` /
``F.embedding`` calls by the identity of their weight tensor (the very tensors passed to
``functional_call``) and hands each call and its output ``y`` to a tap; Hugging Face's
``Conv1D`` (GPT-2) is a ``transposed_linear`` layer, its
``torch.addmm(bias, x.view(-1, in), weight)`` recognised the same way. ``nn.MultiheadAttention``
runs its projections inside ``F.multi_head_attention_forward``, out of a handler's sight, so
that call is computed by :func:`~logix_func.layers.mha_forward` instead. Any other use of a
covered weight (a tied weight in a matmul, a parametrisation) is refused. A forward that calls
:func:`~logix_func._watch.watch` hands the tap any other tensor the same way.

A weight shared by several projectable modules (tied input and output embeddings) is covered
once, under its layer; :func:`tied_uses` lists the other modules' uses of it.

:class:`Pass` adds a zero tensor ``e`` to every tapped output. The gradient of the summed loss
with respect to ``e`` is the per-token output gradient ``δ`` of each sample at once (samples do
not interact in the batched pass). Two backends differentiate the ``e``'s:

* plain eager mode: ``torch.autograd.grad``, the ``e``'s being leaves created as the forward
  reaches each call (one forward, one backward without weight gradients);
* under ``torch.compile`` or a ``torch.func`` transform (the one test of which is
  :func:`~logix_func._compat.under_transform`): ``torch.func.grad`` of a function of the
  ``e``'s, whose shapes come from a first forward pass (dead code once compiled).

The reducers over this engine are :func:`~logix_func._projected_grads.projected_grads` (LoGra
projected gradients) and :func:`~logix_func._capture.capture` (activations and their
gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._batch import ModelBatch, summed_sample_losses
from ._checks import check_modes, check_params, draws_random, random_error
from ._compat import reparametrize_module, tree_leaves, under_transform
from ._grads import split_weights
from ._projection import ProjectionSpec
from ._watch import watch
from .layers import Call, LayerSpec, describe, mha_forward, projectable_layers

Tap = Callable[[str, Call | None, Tensor], Tensor]
"""``tap(name, call, y) -> y'``: sees a covered call's output (``call`` None for a watched
tensor) and returns what the forward goes on with."""
Record = Callable[[str, Call | None, Tensor], Any]
"""``record(name, call, y)``: what a pass keeps of a tapped output (tensors only)."""
Uses = Mapping[str, tuple[LayerSpec, Tensor]]
"""``{module: (layout, weight)}``: the calls a pass taps, by module name."""
Weights = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]
# uses of a covered weight that only read its metadata (properties, then methods)
_METADATA = {"shape", "dtype", "device", "requires_grad", "is_leaf", "ndim", "layout", "names"}
_METADATA |= {"is_cuda", "is_sparse", "is_quantized", "is_meta", "is_nested", "grad_fn", "nbytes"}
_INSPECT = {"size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size"}
_INSPECT |= {"is_floating_point", "is_complex", "get_device", "__len__", "__hash__", "__format__"}


def prepare(
    model: nn.Module, params: Mapping[str, Tensor], batch: Any
) -> tuple[ModelBatch, Weights]:
    """Checked batch and ``(detached params, the model's other params, buffers)`` of a pass."""
    check_params(model, params)
    check_modes(model, None)
    mb = ModelBatch.from_batch(batch)
    fixed, buffers = split_weights(model, params)
    return mb, ({n: p.detach() for n, p in params.items()}, fixed, buffers)


def covered_layers(
    model: nn.Module, layers: Mapping[str, LayerSpec], tensors: Mapping[str, Tensor]
) -> dict[str, tuple[LayerSpec, Tensor]]:
    """``layers`` (a spec's) checked against ``model``, with the weight tensor each one uses."""
    modules = dict(model.named_modules())
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    every = dict(model.named_parameters(remove_duplicate=False))
    covered = {}
    for name, layer in layers.items():
        if name not in modules:
            raise KeyError(
                f"spec layer {name!r} is not a module of {type(model).__name__}: "
                "was the spec built for another model?"
            )
        actual = describe(name, modules[name])
        if actual is None or not actual.same_layout(layer):
            raise ValueError(
                f"spec layer {name!r} is {layout(layer)} but the model's module is "
                f"{layout(actual)}: was the spec built for another model?"
            )
        covered[name] = (layer, tensors[canonical[id(every[layer.weight])]])
    return covered


def tied_uses(
    model: nn.Module, layers: Mapping[str, tuple[LayerSpec, Tensor]]
) -> dict[str, tuple[str, LayerSpec, bool]]:
    """Other modules using a covered layer's weight: ``{module: (layer, its layout, swapped)}``.

    ``swapped``: the module's gradient layout is the transpose of the layer's (an ``nn.Linear``
    head tied to an ``nn.Embedding``). The module's layout carries the layer's ranks (swapped
    with the roles) and no bias: a tied module's own bias is a parameter of its own, not covered.
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
                f"({layout(layer)}), a tie the engine covers only between linear and "
                "embedding layers without bias on the covered one; exclude "
                f"{owner!r} from the spec (logra(..., layers=[...]))"
            )
        if use.kind == layer.kind:
            continue  # the same call as the layer's own, on the same weight: already its tokens
        ranks = (layer.rank_in, layer.rank_out) if swapped else (layer.rank_out, layer.rank_in)
        tied[name] = (owner, replace(use, bias=None).with_ranks(*ranks), swapped)
    return tied


def layout(layer: LayerSpec | None) -> str:
    """A layer's layout in words, for error messages."""
    if layer is None:
        return "not projectable"
    bias = "with" if layer.bias else "without"
    groups = f", groups={layer.groups}" if layer.groups != 1 else ""
    return (
        f"a {layer.kind} {layer.in_features}→{layer.out_features} {bias} bias{groups} "
        f"(weight {layer.weight!r})"
    )


def projectors(
    spec: ProjectionSpec, covered: Mapping[str, tuple[LayerSpec, Tensor]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (P_out [k_out, out], P_in [k_in, in'])}`` in the dtype and on the device of
    each covered layer's weight."""
    groups: dict[tuple, list[str]] = {}
    for name, (_, w) in covered.items():
        groups.setdefault((w.device, w.dtype), []).append(name)
    mats = {}
    for (device, dtype), names in groups.items():
        mats.update(spec.projectors(names, device, dtype))
    return mats


def token_mask(tensors: dict[str, Any]) -> Bool[Tensor, "batch seq"] | None:
    """The batch's ``attention_mask`` ``[B, T]`` as bools, if it has one."""
    mask = tensors["kwargs"].get("attention_mask")
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def call_mask(layer: LayerSpec, mask: Tensor | None, v: Tensor) -> Bool[Tensor, "batch tokens"]:
    """The attention mask where this call's tokens ``v [B, T, ...]`` are the sequence, else all
    True."""
    sequence = (
        mask is not None and not layer.kind.startswith("conv") and v.shape[1] == mask.shape[1]
    )
    if sequence:
        return mask
    return torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)


class Pass:
    """Batched passes of ``model`` with the ``uses``' calls (and ``watched`` tensors) tapped.

    ``forward`` runs the model once and keeps ``record(name, call, y)`` of every tapped output;
    ``output_grads`` also returns the output gradient ``δ = ∂(Σ_i loss_i)/∂y`` of each.
    Both return ``{name: [one entry per call, in call order]}``, names in the order first seen.
    """

    def __init__(
        self,
        model: nn.Module,
        mb: ModelBatch,
        weights: Weights,
        uses: Uses,
        watched: Collection[str] | bool = (),
    ):
        self.model, self.mb, self.weights = model, mb, weights
        self.uses, self.watched = uses, watched

    def forward(
        self,
        tensors: dict[str, Any],
        batch: int,
        record: Record | None,
        add: Callable[[str, Tensor], Tensor] = lambda name, y: y,
    ) -> tuple[Any, dict[str, list]]:
        """The model's outputs and what ``record`` kept; ``add(name, y)`` replaces each tapped
        output ``y``. Without ``record`` nothing is kept."""
        kept: dict[str, list] = {}

        def tap(name: str, call: Call | None, y: Tensor) -> Tensor:
            if record is not None:
                kept.setdefault(name, []).append(record(name, call, y))
            return add(name, y)

        mode = Intercept(self.uses, batch, tap, self.watched)
        with mode:
            outputs = self.mb.call(self.model, self.weights, tensors)
        mode.check_all_called()
        return outputs, kept

    def output_grads(
        self,
        tensors: dict[str, Any],
        batch: int,
        record: Record,
        loss_of: Callable[[Any, dict[str, Any]], Tensor],
    ) -> tuple[dict[str, list[Tensor]], dict[str, list]]:
        """``(δ's, kept)``: ``δ`` shaped like each tapped output, for the loss summed over the
        samples, each sample's ``loss_of(outputs, sample)`` computed on its own."""
        run = self._functional if under_transform() else self._autograd
        try:
            return run(tensors, batch, record, loss_of)
        except RuntimeError as err:
            if "saved tensor hooks" not in str(err):
                raise
            raise RuntimeError(
                "the model uses non-reentrant gradient checkpointing (torch.utils.checkpoint), "
                "which torch.func transforms do not support; projected_grads and capture use "
                "them under torch.compile and inside vmap/grad. Call it eagerly, or disable "
                "checkpointing"
            ) from err

    def _check_grad_enabled(self, name: str) -> None:
        if not torch.is_grad_enabled():
            what = "covered layer" if name in self.uses else "watched tensor"
            raise RuntimeError(
                f"{what} {name!r} ran with gradients disabled inside the model's forward "
                "(torch.no_grad, or torch.utils.checkpoint with use_reentrant=True, whose "
                "forward runs without gradients): its gradient cannot be seen. Use "
                "non-reentrant checkpointing: checkpoint(..., use_reentrant=False), or "
                "{'use_reentrant': False} as a transformers model's "
                "activation_checkpointing_enable / gradient_checkpointing_enable kwargs"
            )

    def _autograd(self, tensors, batch, record, loss_of) -> tuple[dict, dict]:
        """Plain eager mode: zero leaves created as the forward reaches each tapped output."""
        es: dict[str, list[Tensor]] = {}

        def zero_leaf(name: str, y: Tensor) -> Tensor:
            self._check_grad_enabled(name)
            # a broadcast view of a zero scalar: shaped like the output, no memory of its own
            es.setdefault(name, []).append(y.new_zeros((), requires_grad=True).expand(y.shape))
            return y + es[name][-1]

        # the pass's weights stay in the model through the backward too: a non-reentrant
        # checkpointed block recomputes its forward there, and must see the same tensors
        merged = {k: v for part in self.weights for k, v in part.items()}
        in_place = reparametrize_module(self.model, merged, tie_weights=True)
        with torch.enable_grad(), in_place:
            outputs, kept = self.forward(tensors, batch, record, zero_leaf)
            flat = [e for name in kept for e in es[name]]
            grads = ()
            if flat:  # nothing to differentiate when no tapped output was reached
                loss = summed_sample_losses(loss_of, outputs, tensors)
                grads = torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True)
        it = iter(grads)
        return {name: [next(it) for _ in es[name]] for name in kept}, kept

    def _functional(self, tensors, batch, record, loss_of) -> tuple[dict, dict]:
        """Under torch.compile or a torch.func transform: ``torch.func.grad`` of the ``e``'s.

        Their shapes come from a forward without backward in which the tapped outputs depend
        on a (zero) differentiated input, as in the real pass, so that the model takes the same
        code paths; under torch.compile that pass is dead code and costs nothing.
        """
        shapes: dict[str, list[tuple]] = {}

        def shape_pass(zero: Tensor) -> Tensor:
            def add(name: str, y: Tensor) -> Tensor:
                shapes.setdefault(name, []).append((y.shape, y.dtype, y.device))
                return y + zero

            self.forward(tensors, batch, None, add)
            return zero

        first = next(iter(self.uses.values()), (None, None))[1]
        device = (first if first is not None else tree_leaves(tensors)[0]).device
        torch.func.vjp(shape_pass, torch.zeros((), device=device))
        es = {  # broadcast views of zero scalars: no memory of their own
            name: tuple(torch.zeros((), dtype=t, device=d).expand(s) for s, t, d in calls)
            for name, calls in shapes.items()
        }

        def total(es: dict[str, tuple[Tensor, ...]]) -> tuple[Tensor, dict]:
            counts: dict[str, int] = {}

            def next_zero(name: str, y: Tensor) -> Tensor:
                self._check_grad_enabled(name)
                i = counts[name] = counts.get(name, -1) + 1
                if i >= len(es.get(name, ())) or es[name][i].shape != y.shape:
                    raise RuntimeError(
                        f"{name!r}: call {i} has output shape {tuple(y.shape)}, which the shape "
                        "pass did not see; the model's forward must not depend on values"
                    )
                return y + es[name][i]

            outputs, kept = self.forward(tensors, batch, record, next_zero)
            return summed_sample_losses(loss_of, outputs, tensors), kept

        return torch.func.grad(total, has_aux=True)(es)


class Intercept(TorchFunctionMode):
    """Routes the ``uses``' calls, and the ``watched`` tensors, through ``tap`` while the model
    runs (``watched``: names of :func:`~logix_func._watch.watch` calls, or True for all)."""

    def __init__(
        self,
        uses: Uses,
        batch: int,
        tap: Tap,
        watched: Collection[str] | bool = (),
    ):
        super().__init__()
        self.by_call = {(layer.kind, id(w)): name for name, (layer, w) in uses.items()}
        self.covered = {id(w): name for name, (_, w) in uses.items()}
        self.calls = dict.fromkeys(uses, 0)
        self.kinds = {name: layer.kind for name, (layer, _) in uses.items()}
        self.batch, self.tap, self.watched = batch, tap, watched
        self.seen_watched: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is watch and self.watched:
            return self.watched_call(*args, **kwargs)
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

    def watched_call(self, name: str, t: Tensor) -> Tensor:
        if self.watched is not True and name not in self.watched:
            return t
        if name in self.seen_watched or self.calls.get(name):
            raise ValueError(
                f"watch({name!r}) is called twice in one forward (or names a captured "
                "layer); use distinct names"
            )
        if t.dim() < 1 or t.shape[0] != self.batch:
            raise ValueError(
                f"watched tensor {name!r} has shape {tuple(t.shape)}, whose first dimension "
                f"is not the batch ({self.batch})"
            )
        self.seen_watched.add(name)
        return self.tap(name, None, t)

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
                    f"beta={beta}, alpha={alpha}: projected_grads and capture need "
                    f"beta = alpha = 1 and input rows that are the batch's ({self.batch}) "
                    "tokens, batch first"
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
                f"dimension is not the batch ({b}); projected_grads and capture need the "
                "covered layers to see the batch first (batch-first models), or an input "
                "shared by every sample "
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
            "and capture cannot project (only the layer's own linear/conv/embedding call is); "
            "its gradient "
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
