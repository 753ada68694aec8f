"""Each private torch and Hugging Face call of ``logix_func._compat`` on the installed versions.

References: nested containers taken apart and rebuilt by hand, ``functional_call``, an explicit
``TorchFunctionMode``, eager code against ``grad``/``vmap``/``torch.compile``, and the columns a
model's ``forward`` names.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from logix_func import _compat


def test_pytree_takes_apart_and_rebuilds_nested_containers():
    a, b, c = torch.tensor(1.0), torch.tensor([2.0, 3.0]), torch.tensor(4.0)
    tree = {"x": [a, (b,)], "y": c}
    leaves, spec = _compat.tree_flatten(tree)
    assert [t.tolist() for t in leaves] == [1.0, [2.0, 3.0], 4.0]
    assert [t.tolist() for t in _compat.tree_leaves(tree)] == [1.0, [2.0, 3.0], 4.0]
    doubled = _compat.tree_unflatten([2 * t for t in leaves], spec)
    assert doubled["x"][0].item() == 2.0 and doubled["x"][1][0].tolist() == [4.0, 6.0]
    assert doubled["y"].item() == 8.0
    shifted = _compat.tree_map(lambda t: t + 1, tree)
    assert shifted["x"][1][0].tolist() == [3.0, 4.0] and shifted["y"].item() == 5.0


def test_reparametrize_module_swaps_parameters_and_restores_them():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    other = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with _compat.reparametrize_module(model, other, tie_weights=True):
        inside = model(x)
    assert torch.allclose(inside, x @ other["weight"].T + other["bias"])
    assert torch.allclose(inside, functional_call(model, other, (x,)))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_torch_function_mode_enabled_only_inside_a_mode():
    assert not _compat.torch_function_mode_enabled()
    with TorchFunctionMode():
        assert _compat.torch_function_mode_enabled()
    assert not _compat.torch_function_mode_enabled()


def test_under_transform_is_true_under_grad_vmap_and_compile_only():
    seen = []

    def f(x):
        seen.append(_compat.under_transform())
        return (x * x).sum()

    f(torch.ones(2))
    grad(f)(torch.ones(2))
    vmap(f)(torch.ones(3, 2))

    @torch.compile(fullgraph=True, backend="eager")
    def compiled(x):
        return x + 1 if _compat.under_transform() else x - 1

    assert seen == [False, True, True]
    assert compiled(torch.zeros(1)).item() == 1.0
    assert _compat.under_transform() is False


def test_trainer_column_handling_drops_what_forward_does_not_take(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 1)

        def forward(self, inputs, labels=None):
            return {"loss": (self.w(inputs).squeeze(-1) - labels).pow(2).mean()}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=Model(), args=args)
    rows = [{"inputs": [1.0, 2.0], "labels": 0.5, "source": 3}] * 2
    collator = _compat.collator_with_removed_columns(trainer, trainer.data_collator, "check")
    batch = collator(rows)
    assert set(batch) == {"inputs", "labels"}
    assert batch["inputs"].tolist() == [[1.0, 2.0], [1.0, 2.0]]

    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list(rows)
    kept = _compat.remove_unused_columns(trainer, table, "check")
    assert set(kept.column_names) == {"inputs", "labels"}
    assert kept[0]["inputs"] == [1.0, 2.0]
