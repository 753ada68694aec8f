"""Reference problems on scikit-learn's digits, shared by tests, the demo and benchmarks.

Everything here is deterministic and runs in float64 unless asked otherwise:

- `digits_split`: a seeded train/test split of `load_digits` (1300 train, 497 test), pixels in
  [0, 1]; `SPLIT_SEED` is the reference split.
- Logistic regression: a plain ``nn.Linear(64, 10)`` minimising
  ``logreg_objective = mean cross-entropy + (l2 / 2) * (||W||² + ||b||²)``. The bias is
  regularised too, which keeps the Hessian positive definite (softmax is unchanged when the same
  constant is added to every logit, so an unregularised bias leaves one flat direction).
  `train_logreg` minimises it with L-BFGS, then Newton steps, to max |gradient| <= 1e-12.
  Without a bias (``bias=False``), a constant input column (`with_constant`) plays its part.
- MLP: ``Linear(64, 32) → tanh → Linear(32, 10)`` (``width`` and ``depth`` hidden layers are
  options) minimising
  ``mlp_objective = mean cross-entropy + (weight_decay / 2) * ||θ||²`` with a fixed full-batch
  Adam schedule (`train_mlp`); only the initialisation depends on the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.func import functional_call

N_TRAIN = 1300
SPLIT_SEED = 0
LOGREG_L2 = 1e-3
MLP_WIDTH = 32
MLP_WEIGHT_DECAY = 1e-3
MLP_STEPS = 500
MLP_LR = 1e-2

Params = dict[str, Tensor]


def load_digits_tensors(
    dtype: torch.dtype = torch.float32,
) -> tuple[Float[Tensor, "1797 64"], Int[Tensor, " 1797"]]:
    """scikit-learn's bundled digits: ``[1797, 64]`` pixels in [0, 1] and ``[1797]`` labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed train/test split; ``train_index``/``test_index`` point into `load_digits`."""

    train_x: Float[Tensor, "n 64"]
    train_y: Int[Tensor, " n"]
    test_x: Float[Tensor, "q 64"]
    test_y: Int[Tensor, " q"]
    train_index: Int[Tensor, " n"]
    test_index: Int[Tensor, " q"]


def digits_split(dtype: torch.dtype = torch.float64, seed: int = SPLIT_SEED) -> DigitsSplit:
    """A seeded permutation, the first `N_TRAIN` rows train, the rest test (`SPLIT_SEED`: the
    reference split)."""
    x, y = load_digits_tensors(dtype)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return DigitsSplit(x[train], y[train], x[test], y[test], train, test)


def _l2_penalty(params: Params) -> Tensor:
    return sum(p.square().sum() for p in params.values())


def logreg_model(
    dtype: torch.dtype = torch.float64, *, inputs: int = 64, bias: bool = True
) -> nn.Linear:
    """The logistic-regression module (its own initial weights are never used)."""
    return nn.Linear(inputs, 10, bias=bias, dtype=dtype)


def with_constant(x: Float[Tensor, "n d"]) -> Float[Tensor, "n d+1"]:
    """``[x, 1]``: the inputs with a constant column appended (a bias folded into the weight)."""
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def logreg_objective(
    params: Params, x: Float[Tensor, "n d"], y: Int[Tensor, " n"], l2: float = LOGREG_L2
) -> Tensor:
    """Mean cross-entropy of ``x @ weight.T (+ bias)`` plus ``(l2 / 2) * ||params||²`` (bias too).

    Without a ``"bias"`` entry the model is ``x @ weight.T`` alone (see `with_constant`).
    """
    logits = x @ params["weight"].T + params.get("bias", 0.0)
    return nn.functional.cross_entropy(logits, y) + 0.5 * l2 * _l2_penalty(params)


def train_logreg(
    x: Float[Tensor, "n d"],
    y: Int[Tensor, " n"],
    l2: float = LOGREG_L2,
    init: Params | None = None,
    *,
    tol: float = 1e-12,
    bias: bool = True,
) -> Params:
    """Minimise `logreg_objective` to max |gradient| <= ``tol``: L-BFGS, then Newton steps.

    Starts from ``init`` (a warm start) or from zeros. L-BFGS stalls near 1e-10 in float64, so
    Newton steps with the dense closed-form Hessian (650 x 650) finish the job. Returns
    ``{"weight": [10, d], "bias": [10]}`` (no ``"bias"`` when ``bias=False``) in the dtype of
    ``x``; raises if ``tol`` is not met.
    """
    if init is None:
        init = {"weight": torch.zeros(10, x.shape[1], dtype=x.dtype)}
        if bias:
            init["bias"] = torch.zeros(10, dtype=x.dtype)
    bias = "bias" in init
    params = {k: v.detach().clone().to(x.dtype).requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.LBFGS(
        list(params.values()),
        max_iter=2000,
        tolerance_grad=1e-8,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = logreg_objective(params, x, y, l2)
        loss.backward()
        return loss

    opt.step(closure)

    # Newton on theta = [W | b] ([10, 65]) with the closed-form Hessian of softmax regression:
    # H = (1/n) Σ_n (diag(p_n) - p_n p_nᵀ) ⊗ x̃_n x̃_nᵀ + l2 I, x̃ = [x, 1] (x alone without bias).
    xt = with_constant(x) if bias else x
    theta = params["weight"].detach()
    if bias:
        theta = torch.cat([theta, params["bias"][:, None].detach()], dim=1)
    onehot = nn.functional.one_hot(y, theta.shape[0]).to(x.dtype)
    eye = torch.eye(theta.numel(), dtype=x.dtype)
    for _ in range(10):
        prob = torch.softmax(xt @ theta.T, dim=1)
        grad = (prob - onehot).T @ xt / len(y) + l2 * theta
        if grad.abs().max() <= tol:
            if not bias:
                return {"weight": theta.clone()}
            return {"weight": theta[:, :-1].clone(), "bias": theta[:, -1].clone()}
        curv = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        hess = torch.einsum("nab,nj,nk->ajbk", curv, xt, xt).reshape(eye.shape) / len(y)
        step = torch.linalg.solve(hess + l2 * eye, grad.flatten())
        theta = theta - step.view_as(theta)
    raise RuntimeError(
        f"train_logreg did not converge: max |grad| = {grad.abs().max():.3g} > tol = {tol:.3g}"
    )


def mlp_model(
    width: int = MLP_WIDTH, dtype: torch.dtype = torch.float64, *, depth: int = 1
) -> nn.Sequential:
    """``Linear(64, width) → Tanh → … → Linear(width, 10)`` with ``depth`` hidden layers;
    parameters named ``0.*``, ``2.*``, … (``2 * depth``)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in _mlp_shapes(width, depth):
        layers += [nn.Linear(fan_in, fan_out, dtype=dtype), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _mlp_shapes(width: int, depth: int) -> list[tuple[int, int]]:
    sizes = [64] + [width] * depth + [10]
    return list(zip(sizes[:-1], sizes[1:], strict=True))


def mlp_init(
    seed: int, width: int = MLP_WIDTH, dtype: torch.dtype = torch.float64, *, depth: int = 1
) -> Params:
    """PyTorch's default initialisation of `mlp_model`, drawn from ``torch.Generator(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(_mlp_shapes(width, depth)):
        bound = fan_in**-0.5  # kaiming_uniform(a=√5) and the bias both give U(±1/√fan_in)
        weight = torch.rand((fan_out, fan_in), generator=gen, dtype=dtype)
        params[f"{2 * i}.weight"] = (weight * 2 - 1) * bound
        params[f"{2 * i}.bias"] = (torch.rand(fan_out, generator=gen, dtype=dtype) * 2 - 1) * bound
    return params


def mlp_objective(
    model: nn.Module,
    params: Params,
    x: Float[Tensor, "n 64"],
    y: Int[Tensor, " n"],
    weight_decay: float = MLP_WEIGHT_DECAY,
) -> Tensor:
    """Mean cross-entropy of ``model`` with ``params`` plus ``(weight_decay / 2) * ||params||²``."""
    logits = functional_call(model, params, (x,))
    return nn.functional.cross_entropy(logits, y) + 0.5 * weight_decay * _l2_penalty(params)


def train_mlp(
    x: Float[Tensor, "n 64"],
    y: Int[Tensor, " n"],
    seed: int,
    *,
    width: int = MLP_WIDTH,
    depth: int = 1,
    weight_decay: float = MLP_WEIGHT_DECAY,
    steps: int = MLP_STEPS,
    lr: float = MLP_LR,
) -> Params:
    """One MLP trained by `train_mlps` on all of ``x``: ``{name: tensor}``, detached."""
    stacked = train_mlps(
        x, y, [seed], width=width, depth=depth, weight_decay=weight_decay, steps=steps, lr=lr
    )
    return {k: v[0] for k, v in stacked.items()}


def train_mlps(
    x: Float[Tensor, "n 64"],
    y: Int[Tensor, " n"],
    seeds: list[int],
    masks: Bool[Tensor, "m n"] | None = None,
    *,
    width: int = MLP_WIDTH,
    depth: int = 1,
    weight_decay: float = MLP_WEIGHT_DECAY,
    steps: int = MLP_STEPS,
    lr: float = MLP_LR,
) -> Params:
    """Train ``m = len(seeds)`` independent MLPs at once: model k on the rows ``masks[k]``.

    Each model minimises `mlp_objective` on its rows from `mlp_init(seeds[k])` with full-batch
    Adam (``lr`` cosine-decayed to 0 over ``steps`` steps). Adam is elementwise and the summed
    objective's gradient for model k is model k's own gradient, so this equals training each
    model alone. Returns stacked parameters ``{name: [m, *shape]}``, detached.
    """
    if masks is None:
        masks = torch.ones(len(seeds), len(y), dtype=torch.bool)
    if masks.shape != (len(seeds), len(y)) or masks.dtype != torch.bool:
        raise ValueError(
            f"masks must be Bool[{len(seeds)}, {len(y)}], got {masks.dtype} {masks.shape}"
        )
    if not masks.any(dim=1).all():
        raise ValueError("every model needs at least one training row: a row of masks is empty")
    inits = [mlp_init(s, width, x.dtype, depth=depth) for s in seeds]
    params = {k: torch.stack([p[k] for p in inits]).requires_grad_(True) for k in inits[0]}
    # Model k sees its own rows, padded with row 0 at weight 0 up to the largest subset.
    counts = masks.sum(dim=1)
    rows = torch.argsort(masks.to(torch.int8), dim=1, descending=True, stable=True)
    rows = rows[:, : int(counts.max())]
    weights = (torch.arange(rows.shape[1]) < counts[:, None]).to(x.dtype) / counts[:, None]
    rows = torch.where(weights > 0, rows, 0)
    inputs, targets = x[rows], y[rows][..., None]

    def batched_loss(p: Params) -> Tensor:  # stacked mlp_model forward: [m, n] losses
        hidden = inputs
        for i in range(depth):
            hidden = torch.baddbmm(p[f"{2 * i}.bias"][:, None], hidden, p[f"{2 * i}.weight"].mT)
            hidden = hidden.tanh()
        out = f"{2 * depth}"
        logits = torch.baddbmm(p[f"{out}.bias"][:, None], hidden, p[f"{out}.weight"].mT)
        return -logits.log_softmax(-1).gather(-1, targets)[..., 0]

    opt = torch.optim.Adam(list(params.values()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        opt.zero_grad()
        total = (weights * batched_loss(params)).sum() + 0.5 * weight_decay * _l2_penalty(params)
        total.backward()
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in params.items()}


def per_example_loss(
    model: nn.Module, params: Params, x: Float[Tensor, "n 64"], y: Int[Tensor, " n"]
) -> Float[Tensor, " n"]:
    """Cross-entropy of each example (no regulariser)."""
    with torch.no_grad():
        logits = functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits, y, reduction="none")


def per_example_margin(
    model: nn.Module, params: Params, x: Float[Tensor, "n d"], y: Int[Tensor, " n"]
) -> Float[Tensor, " n"]:
    """TRAK's margin ``logit_y - logsumexp_{c != y} logit_c`` of each example (higher: better)."""
    with torch.no_grad():
        logits = functional_call(model, params, (x,))
        correct = logits.gather(1, y[:, None])[:, 0]
        others = logits.scatter(1, y[:, None], -torch.inf)
        return correct - others.logsumexp(dim=1)


def negative_margin(logits: Float[Tensor, "b classes"], targets: Int[Tensor, " b"]) -> Tensor:
    """A query measurement with ``loss_fn``'s signature: minus TRAK's margin,
    ``Σ_b logsumexp_{c != y_b} logit_bc - logit_{b y_b}`` (lower: the model is surer of ``y``)."""
    hit = torch.arange(logits.shape[-1], device=logits.device) == targets[..., None]
    correct = (logits * hit).sum(-1)
    others = logits.masked_fill(hit, float("-inf")).logsumexp(-1)
    return (others - correct).sum()
