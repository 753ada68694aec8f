"""Bad input gets an error that names the problem."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from logix_func import per_sample_grads


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def data(n=5):
    return torch.randn(n, 4), torch.randint(0, 3, (n,))


class Calls(nn.Module):
    """A linear layer followed by ``op(h)``."""

    def __init__(self, op):
        super().__init__()
        self.lin, self.op = nn.Linear(4, 3), op

    def forward(self, x):
        return self.op(self.lin(x))


def grads_of(model, batch, **kw):
    return per_sample_grads(model, dict(model.named_parameters()), batch, **kw)


def test_empty_batch():
    x, y = data(0)
    with pytest.raises(ValueError, match=r"batch is empty"):
        grads_of(mlp(), (x, y))


def test_inputs_and_targets_of_different_batch_sizes():
    x, y = data()
    with pytest.raises(
        ValueError, match=r"disagree on the batch size \(inputs\[0\]: 5, targets: 4\)"
    ):
        grads_of(mlp(), (x, y[:4]))


def test_dict_batch_entries_of_different_batch_sizes():
    model = nn.Embedding(5, 3)
    batch = {"input": torch.zeros(4, 2, dtype=torch.long), "labels": torch.zeros(3, 2).long()}
    with pytest.raises(ValueError, match=r"disagree on the batch size \(input: 4, targets: 3\)"):
        grads_of(model, batch)


def test_dict_batch_without_labels():
    with pytest.raises(ValueError, match=r"needs a 'labels' entry"):
        grads_of(mlp(), {"input": torch.zeros(2, 4)})


def test_batch_that_is_a_bare_tensor():
    with pytest.raises(TypeError, match=r"batch must be \(inputs, targets\)"):
        grads_of(mlp(), torch.zeros(2, 4))


def test_params_not_in_the_model():
    model = mlp()
    with pytest.raises(KeyError, match=r"params names not in the model: \['fc.weight'\]"):
        per_sample_grads(model, {"fc.weight": torch.zeros(6, 4)}, data())


def test_tied_alias_name_is_refused_and_the_first_name_suggested():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(KeyError, match=r"\['1.weight'\].*tied parameters appear once"):
        per_sample_grads(model, {"1.weight": model[0].weight}, data())


def test_non_floating_params():
    model = mlp()
    with pytest.raises(TypeError, match=r"parameter '0.bias' must be a floating-point.*int64"):
        per_sample_grads(model, {"0.bias": torch.zeros(6, dtype=torch.long)}, data())


def test_params_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"'0.bias' has shape \(5,\), the model's has \(6,\)"):
        per_sample_grads(mlp(), {"0.bias": torch.zeros(5)}, data())


def test_empty_params():
    with pytest.raises(ValueError, match=r"non-empty \{name: Tensor\} dict"):
        per_sample_grads(mlp(), {}, data())


def test_unknown_buffer_names():
    model = mlp()
    with pytest.raises(KeyError, match=r"buffers names not in the model: \['running_mean'\]"):
        grads_of(model, data(), buffers={"running_mean": torch.zeros(6)})


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_chunk_size(bad):
    with pytest.raises(ValueError, match=r"chunk_size must be None or a positive int"):
        grads_of(mlp(), data(), chunk_size=bad)


def test_bad_randomness():
    with pytest.raises(
        ValueError, match=r"randomness must be one of \('error', 'different', 'same'\)"
    ):
        grads_of(mlp(), data(), randomness="off")


def test_loss_that_is_not_a_scalar_per_sample():
    def token_losses(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none").expand(2)

    with pytest.raises(ValueError, match=r"scalar \(sum over its tokens\); got \(2,\)"):
        grads_of(mlp(), data(), loss_fn=token_losses)


def test_default_loss_with_mismatched_targets():
    x, _ = data()
    with pytest.raises(
        ValueError, match=r"outputs of shape \(1, 3\) do not match floating targets"
    ):
        grads_of(mlp(), (x, torch.randn(5, 2)))
    with pytest.raises(ValueError, match=r"logits of shape \(1, 3\) do not match integer targets"):
        grads_of(mlp(), (x, torch.zeros(5, 2, dtype=torch.long)))


def test_item_inside_forward_names_the_line_and_what_to_do():
    model = Calls(lambda h: h * h.sum().item())
    with pytest.raises(
        RuntimeError, match=r"(?s)test_grads_errors.py:\d+ .*\.item\(\).*What to do"
    ):
        grads_of(model, data(), strategy="vmap")
    with pytest.warns(UserWarning, match=r"(?s)test_grads_errors.py:\d+ .*falls back"):
        grads_of(model, data())  # the default strategy loops instead


def test_nonzero_inside_forward_names_the_op():
    model = Calls(lambda h: h + torch.nonzero(h).sum())
    with pytest.raises(RuntimeError, match=r"(?s)could not batch.*aten::nonzero.*What to do"):
        grads_of(model, data())


def test_data_dependent_control_flow():
    model = Calls(lambda h: h if h.sum() > 0 else -h)
    with pytest.raises(RuntimeError, match=r"(?s)could not batch.*data-dependent control flow"):
        grads_of(model, data(), strategy="vmap")


def test_batchnorm_in_train_mode():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).train()
    with pytest.raises(ValueError, match=r"'1' is a BatchNorm1d in training mode.*model.eval\(\)"):
        grads_of(model, data())


def test_batchnorm_without_running_statistics():
    bn = nn.BatchNorm1d(6, track_running_stats=False)
    model = nn.Sequential(nn.Linear(4, 6), bn, nn.Linear(6, 3)).eval()
    with pytest.raises(ValueError, match=r"'1' is a BatchNorm1d without running statistics"):
        grads_of(model, data())
