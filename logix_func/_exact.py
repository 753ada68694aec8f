"""Exact curvature for small models: the dense Hessian or GGN of each layer's block.

For a spec layer with gradient matrix ``G [out, in']`` (``[W | b]``, see
:mod:`logix_func.layers`) and projections ``P_out [k_out, out]``, ``P_in [k_in, in']``, the
layer's parameters are moved along ``P_outᵀ Z P_in`` with ``Z [k_out, k_in]``; the block is the
curvature of the mean training loss in ``vec(Z)`` (row-major), ``P H Pᵀ`` with
``P = P_out ⊗ P_in``. Every other parameter is held fixed, so cross-layer blocks are not formed;
with ``joint=True`` all layers move together along ``z = [vec(Z_1); …; vec(Z_L)]`` (layers in
sorted order) and the ``[K, K]`` matrix of all of them, cross-layer blocks included, is kept as
each layer's block row (the factors of :func:`~logix_func.curvature.joint_ggn`).

Built from matrix-vector products against the basis of ``vec(Z)``, ``chunk_size`` directions
per ``vmap`` call: ``kind="hessian"`` uses forward-over-reverse Hessian-vector products,
``kind="ggn"`` the Gauss-Newton products ``Jᵀ H_out J v`` (``J`` the Jacobian of the model's
outputs, ``H_out`` the Hessian of the loss in the outputs). Cost: ``k = k_out·k_in`` products
per layer and batch, memory ``[k, k]`` per layer (joint: ``K = Σ_l k_l`` products, ``[K, K]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ._batch import LossFn, ModelBatch, sample_loss, summed_sample_losses
from ._checks import check_modes, check_params, no_randomness_error
from ._compat import tree_flatten, tree_unflatten
from ._grads import split_weights
from ._origin import stamped
from .curvature._kfac import eigh64
from .typing import Spec

Kind = Literal["ggn", "hessian"]
Block = Float[Tensor, "k k"]


def exact_curvature(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Any,
    spec: Spec,
    *,
    kind: Kind = "ggn",
    loss_fn: LossFn | None = None,
    chunk_size: int = 128,
    dtype: torch.dtype = torch.float64,
    joint: bool = False,
) -> dict[str, Any]:
    """Dense per-layer (or all-layer) curvature of the mean training loss, as raw factors.

    Args:
        model: the model; only called through ``functional_call``, never changed.
        params: ``{name: Tensor}``, the point where the curvature is taken (the model's other
            parameters keep their values).
        data: one batch (``(inputs, targets)`` or a dict with ``labels``) or an iterable of
            batches; the curvature is summed over batches and divided by the number of samples.
        spec: a projection spec (``logra(model, rank=None)`` for the full layers).
        kind: ``"ggn"`` (Gauss-Newton ``Jᵀ H_out J``, PSD for convex losses) or ``"hessian"``.
        loss_fn: loss of one sample as in :func:`logix_func.per_sample_grads`.
        chunk_size: basis directions per ``vmap`` call (memory: that many forward passes).
        dtype: dtype of the accumulated blocks and of the factors.
        joint: the matrix of all layers together, cross-layer blocks included, as block rows
            ``{layer: {"rows": [k_l, K]}}`` (columns in sorted layer order): the preconditioner
            solves it through one Cholesky factor of ``C + diag(λ_l)``, refusing a damping that
            leaves an indefinite Hessian so. Small models only: ``K`` products per batch.

    Returns:
        ``{"spec": tag, "layers": {layer: {"C": [k, k], "Q": [k, k], "eigenvalues": [k]}}}``,
        ``k = k_out·k_in`` in row-major ``vec`` order, the format of :func:`logix_func.raw`:
        ``preconditioner(factors, damping=λ)`` applies ``(C + λI)⁻¹``. Hessian eigenvalues are
        kept as they are (possibly negative); GGN ones are clamped at 0 against rounding.
    """
    if kind not in ("ggn", "hessian"):
        raise ValueError(f"kind must be 'ggn' or 'hessian', got {kind!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_params(model, params)
    check_modes(model, None)
    fixed, buffers = split_weights(model, params)
    base = {**fixed, **{n: p.detach() for n, p in params.items()}}
    names = _layer_params(model, spec, base)
    movers = {name: _mover(spec, name, names[name], base) for name in spec.layers}
    if joint:
        movers = {"": _joint_mover(movers)}
    sums = {
        name: z0.new_zeros(z0.numel(), z0.numel(), dtype=dtype) for name, (_, z0) in movers.items()
    }
    samples = 0
    for batch in _batches(data):
        mb = ModelBatch.from_batch(batch)
        loss_of = sample_loss(model, mb, loss_fn)
        for name, (move, z0) in movers.items():
            try:
                block = _block(model, mb, loss_of, buffers, move, z0, kind, chunk_size)
            except RuntimeError as err:
                raise no_randomness_error(err) from err
            sums[name] += block.to(dtype)
        samples += mb.size
    if samples == 0:
        raise ValueError("exact_curvature got no batches: data is an empty iterable")
    factors = {}
    if joint:  # block rows of the [K, K] matrix, layers sorted (as joint_ggn's)
        c = sums[""] / samples
        dims = sorted(spec.dims().items())
        rows = ((c + c.T) / 2).split([o * i for _, (o, i) in dims])
        factors = {name: {"rows": r} for (name, _), r in zip(dims, rows, strict=True)}
        return stamped({"spec": spec.tag(), "layers": factors}, model, params, loss_fn)
    for name, total in sums.items():
        c = total / samples
        c = (c + c.T) / 2
        values, vectors = eigh64(c) if kind == "ggn" else torch.linalg.eigh(c.double())
        factors[name] = {"C": c, "Q": vectors.to(dtype), "eigenvalues": values.to(dtype)}
    return stamped({"spec": spec.tag(), "layers": factors}, model, params, loss_fn)


def _batches(data: Any) -> Iterable[Any]:
    """``data`` as an iterable of batches (a single batch is wrapped)."""
    single = isinstance(data, Mapping) or (
        isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)
    )
    return [data] if single else data


def _layer_params(
    model: nn.Module, spec: Spec, base: Mapping[str, Tensor]
) -> dict[str, tuple[str, str | None]]:
    """``{layer: (weight name, bias name)}`` as keys of ``base``, checked against ``model``."""
    every = dict(model.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    out = {}
    for name, layer in spec.layers.items():
        names = [layer.weight] + ([layer.bias] if layer.bias else [])
        missing = [n for n in names if n not in every]
        if missing:
            raise KeyError(
                f"spec layer {name!r} names parameters {missing} that {type(model).__name__} "
                "does not have: was the spec built for another model?"
            )
        w = every[layer.weight]
        expected = (
            (layer.in_features, layer.out_features)
            if layer.weight_transposed
            else (layer.out_features, layer.in_features)
        )
        bias_ok = layer.bias is None or every[layer.bias].shape == (layer.out_features,)
        if (w.shape[0], w[0].numel()) != expected or not bias_ok:
            raise ValueError(
                f"spec layer {name!r} expects a weight of {expected[0]}×{expected[1]} "
                f"(flattened) but {layer.weight!r} has shape {tuple(w.shape)}: was the spec "
                "built for another model?"
            )
        out[name] = (
            canonical[id(w)],
            canonical[id(every[layer.bias])] if layer.bias else None,
        )
    return out


def _mover(
    spec: Spec, name: str, names: tuple[str, str | None], base: Mapping[str, Tensor]
) -> tuple[Callable[[Tensor], dict[str, Tensor]], Tensor]:
    """``Z [k_out, k_in] -> params`` with the layer's ``[W | b]`` moved by ``P_outᵀ Z P_in``,
    and the zero ``Z`` where the curvature is taken."""
    layer = spec.layers[name]
    weight, bias = names
    w0 = base[weight]
    p_out, p_in = spec.matrices(name, device=w0.device, dtype=w0.dtype)

    def move(z: Tensor, start: Mapping[str, Tensor] = base) -> dict[str, Tensor]:
        m = p_out.T @ z @ p_in  # [out, in']
        dw = m[:, : layer.in_features]
        dw = dw.T if layer.weight_transposed else dw
        moved = {**start, weight: start[weight] + dw.reshape(w0.shape)}
        if bias is not None:
            moved[bias] = start[bias] + m[:, layer.in_features]
        return moved

    return move, w0.new_zeros(layer.rank_out, layer.rank_in)


def _joint_mover(
    movers: Mapping[str, tuple[Callable[..., dict[str, Tensor]], Tensor]],
) -> tuple[Callable[[Tensor], dict[str, Tensor]], Tensor]:
    """``z [K] -> params`` with every layer moved by its slice of ``z`` (layers sorted), and
    the zero ``z``."""
    names = sorted(movers)
    shapes = [movers[n][1].shape for n in names]

    def move(z: Tensor) -> dict[str, Tensor]:
        parts = z.split([s.numel() for s in shapes])
        params = movers[names[0]][0](parts[0].reshape(shapes[0]))
        for name, part, shape in zip(names[1:], parts[1:], shapes[1:], strict=True):
            params = movers[name][0](part.reshape(shape), params)
        return params

    total = sum(s.numel() for s in shapes)
    return move, movers[names[0]][1].new_zeros(total)


def _block(
    model: nn.Module,
    mb: ModelBatch,
    loss_of: Callable[[Any, dict[str, Any]], Tensor],
    buffers: dict[str, Tensor],
    move: Callable[[Tensor], dict[str, Tensor]],
    z0: Tensor,
    kind: Kind,
    chunk_size: int,
) -> Block:
    """``Σ_samples`` curvature of one layer on one batch: ``[k, k]``."""
    tensors = mb.tensors

    structure: dict[str, Any] = {}

    def outputs(z: Tensor) -> list[Tensor]:
        """The model's output tensors (its other leaves, a cache object say, kept aside)."""
        leaves, structure["tree"] = tree_flatten(mb.call(model, (move(z), buffers), tensors))
        structure["leaves"] = leaves
        return [t for t in leaves if isinstance(t, Tensor)]

    def total(out: list[Tensor]) -> Tensor:
        given = iter(out)
        leaves = [next(given) if isinstance(t, Tensor) else t for t in structure["leaves"]]
        return summed_sample_losses(loss_of, tree_unflatten(leaves, structure["tree"]), tensors)

    if kind == "hessian":
        gradient = torch.func.grad(lambda z: total(outputs(z)))

        def product(v: Tensor) -> Tensor:
            return torch.func.jvp(gradient, (z0,), (v,))[1]
    else:
        out, pullback = torch.func.vjp(outputs, z0)
        out_gradient = torch.func.grad(total)

        def product(v: Tensor) -> Tensor:
            jv = torch.func.jvp(outputs, (z0,), (v,))[1]
            hjv = torch.func.jvp(out_gradient, (out,), (jv,))[1]
            return pullback(hjv)[0]

    k = z0.numel()
    basis = torch.eye(k, dtype=z0.dtype, device=z0.device).reshape(k, *z0.shape)
    rows = [torch.func.vmap(product)(v) for v in basis.split(chunk_size)]
    return torch.cat(rows).reshape(k, k)
