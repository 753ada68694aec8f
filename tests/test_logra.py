"""projected_grads against explicit projections of per_sample_grads' full gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

import logix_func as lf


@pytest.fixture(autouse=True)
def _float64():
    """Comparisons here are in float64."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def mse(outputs, targets):
    return 0.5 * (outputs - targets).pow(2).sum()


def token_ce(outputs, targets):
    """Summed token cross-entropy in float64, -100 ignored."""
    return F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="sum")


def params_of(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def reference(model, batch, spec, loss_fn=None):
    """``P_out G_i P_inᵀ`` built explicitly from per_sample_grads (dense matrices, float64)."""
    full = lf.per_sample_grads(model, params_of(model), batch, loss_fn=loss_fn)
    out = {}
    for name, layer in spec.layers.items():
        g = full[layer.weight]
        g = g.transpose(1, 2) if layer.kind == "embedding" else g.flatten(2)
        if layer.bias is not None:
            g = torch.cat([g, full[layer.bias].unsqueeze(-1)], dim=-1)
        p_out, p_in = spec.matrices(name, dtype=torch.float64)
        out[name] = p_out @ g @ p_in.T
    return out


def assert_matches(model, batch, rank=3, loss_fn=None, **kw):
    model.eval()
    spec = lf.logra(model, rank=rank, seed=7, **kw)
    expected = reference(model, batch, spec, loss_fn)
    got = lf.projected_grads(model, params_of(model), batch, spec, loss_fn=loss_fn)
    got_logs, _ = lf.projected_grads(
        model, params_of(model), batch, spec, loss_fn=loss_fn, return_activations=True
    )
    assert list(got) == list(spec.layers)
    for name in spec.layers:
        layer = spec.layers[name]
        assert got[name].shape == (batch_size(batch), layer.rank_out, layer.rank_in)
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_logs[name], expected[name], rtol=1e-10, atol=1e-12)
    return spec


def batch_size(batch):
    return (batch["labels"] if isinstance(batch, dict) else batch[1]).shape[0]


def test_linear_plain_and_without_bias():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))
    spec = assert_matches(model, (torch.randn(4, 5), torch.randint(0, 3, (4,))))
    assert spec.layers["0"].in_size == 6 and spec.layers["2"].in_size == 6


def test_linear_with_token_dims_sums_tokens():
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3))
    assert_matches(model, (torch.randn(4, 7, 5), torch.randint(0, 3, (4, 7))))
    # two token dimensions and a float target
    assert_matches(model, (torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 3)), loss_fn=mse)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1), bias=False),
        lambda: nn.Conv2d(4, 4, 3, padding="same", groups=4, padding_mode="reflect"),
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        lambda: nn.Conv1d(4, 3, 2, bias=False),
    ],
    ids=["2d-groups", "2d-dilation-nobias", "2d-depthwise-reflect", "1d-groups", "1d-nobias"],
)
def test_convolutions(conv):
    conv = conv()
    length = (7, 7) if isinstance(conv, nn.Conv2d) else (9,)
    x = torch.randn(3, 4, *length)
    features = conv(x).flatten(1).shape[1]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 3))
    assert_matches(model, (x, torch.randint(0, 3, (3,))), rank=(4, 5))


def test_embedding_with_padding_idx():
    model = nn.Sequential(nn.Embedding(10, 5, padding_idx=0), nn.Flatten(), nn.Linear(15, 3))
    ids = torch.randint(0, 10, (4, 3))
    ids[0, 1] = 0
    spec = assert_matches(model, (ids, torch.randint(0, 3, (4,))))
    assert (spec.layers["0"].in_features, spec.layers["0"].out_features) == (10, 5)


def test_rank_none_gives_full_gradients_in_the_same_layout():
    model = nn.Sequential(nn.Conv1d(2, 3, 2, groups=1), nn.Flatten(), nn.Linear(9, 2))
    batch = (torch.randn(4, 2, 4), torch.randint(0, 2, (4,)))
    spec = assert_matches(model, batch, rank=None)
    got = lf.projected_grads(model, params_of(model), batch, spec)
    full = lf.per_sample_grads(model, params_of(model), batch)
    torch.testing.assert_close(got["2"][:, :, :9], full["2.weight"])
    torch.testing.assert_close(got["2"][:, :, 9], full["2.bias"])


class Encoder(nn.Module):
    """Embedding + nn.TransformerEncoderLayer (nn.MultiheadAttention inside) + head."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        return self.head(self.enc(self.emb(input_ids), src_key_padding_mask=pad))


def encoder_batch():
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_transformer_encoder_and_multihead_attention():
    model = Encoder()
    spec = assert_matches(model, encoder_batch(), rank=4, loss_fn=token_ce)
    assert "enc.layers.0.self_attn" in spec.layers  # packed in_proj_weight
    assert spec.layers["enc.layers.0.self_attn"].out_features == 3 * 8
    assert "enc.layers.0.self_attn.out_proj" in spec.layers


def test_multihead_attention_need_weights_and_causal_mask():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
            out, weights = self.attn(x, x, x, attn_mask=causal)
            return self.head(out) + weights.sum()

    batch = (torch.randn(3, 4, 8), torch.randint(0, 3, (3, 4)))
    assert_matches(Block(), batch, rank=4, loss_fn=token_ce)


def test_activations_and_backprops_match_hooks_and_autograd():
    model = Encoder().eval()
    batch = encoder_batch()
    spec = lf.logra(model, rank=4, seed=3, layers=["emb", "enc.layers.0.linear1", "head"])
    params = params_of(model)
    _, logs = lf.projected_grads(
        model, params, batch, spec, loss_fn=token_ce, return_activations=True
    )

    # reference: forward hooks + torch.autograd.grad on the summed per-sample losses
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))
        )
        for n in spec.layers
    ]
    try:
        logits = model(batch["input_ids"], batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    loss = token_ce(logits, batch["labels"])
    deltas = torch.autograd.grad(loss, [seen[n][1] for n in spec.layers])
    mask = batch["attention_mask"].bool()
    for (name, layer), delta in zip(spec.layers.items(), deltas, strict=True):
        p_out, p_in = spec.matrices(name, dtype=torch.float64)
        x = seen[name][0].detach()
        if layer.kind == "embedding":
            a = F.one_hot(x, layer.in_features).double()
        else:
            a = torch.cat([x, torch.ones(*x.shape[:2], 1)], -1) if layer.bias else x
        w = mask.unsqueeze(-1).double()
        torch.testing.assert_close(logs[name]["activations"], (a @ p_in.T) * w)
        torch.testing.assert_close(logs[name]["backprops"], (delta @ p_out.T) * w)
        assert torch.equal(logs[name]["mask"], mask)
        assert logs[name]["activations"][0, 3:].abs().max() == 0  # padded tokens zeroed


def test_logs_of_plain_inputs_and_convolutions_are_unmasked():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(12, 3)).eval()
    batch = (torch.randn(5, 2, 5), torch.randint(0, 3, (5,)))
    spec = lf.logra(model, rank=2)
    _, logs = lf.projected_grads(model, params_of(model), batch, spec, return_activations=True)
    assert logs["0"]["activations"].shape == (5, 2 * 3, 2)  # groups × positions tokens
    assert logs["2"]["backprops"].shape == (5, 1, 2)
    assert all(log["mask"].all() for log in logs.values())


def test_layer_called_twice_accumulates_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lin(torch.tanh(self.lin(x))))

    model = Twice()
    batch = (torch.randn(3, 4), torch.randint(0, 2, (3,)))
    assert_matches(model, batch, rank=3)
    spec = lf.logra(model, rank=3)
    _, logs = lf.projected_grads(model, params_of(model), batch, spec, return_activations=True)
    assert logs["lin"]["activations"].shape == (3, 2, 3)  # one token per call


def test_params_select_the_weights_used():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).eval()
    batch = (torch.randn(3, 4), torch.randint(0, 2, (3,)))
    spec = lf.logra(model, rank=2)
    other = {"2.weight": torch.randn(2, 5)}
    got = lf.projected_grads(model, other, batch, spec)
    changed = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed[2].weight.copy_(other["2.weight"])
    expected = reference(changed, batch, spec)
    for name in spec.layers:
        torch.testing.assert_close(got[name], expected[name])


def test_chunk_size_equals_unchunked_and_vmap_over_params():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).eval()
    batch = (torch.randn(7, 4), torch.randint(0, 2, (7,)))
    spec = lf.logra(model, rank=2)
    params = params_of(model)
    whole = lf.projected_grads(model, params, batch, spec, return_activations=True)
    chunked = lf.projected_grads(model, params, batch, spec, return_activations=True, chunk_size=3)
    torch.testing.assert_close(chunked, whole)

    # under vmap (here over two parameter sets) the torch.func engine runs
    stacked = {n: torch.stack([p, 2 * p]) for n, p in params.items()}
    batched = torch.func.vmap(
        lambda p: lf.projected_grads(model, p, batch, spec, return_activations=True)
    )(stacked)
    for i, scale in enumerate((1, 2)):
        scaled = {n: scale * p for n, p in params.items()}
        one = lf.projected_grads(model, scaled, batch, spec, return_activations=True)
        torch.testing.assert_close(tree_map(lambda t, i=i: t[i], batched), one)


def test_compiled_fullgraph_equals_eager():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    batch = (torch.randn(4, 2, 4, 4), torch.randn(4, 3))
    spec = lf.logra(model, rank=(3, 4))
    params = params_of(model)

    def run(p, b):
        return lf.projected_grads(model, p, b, spec, loss_fn=mse, return_activations=True)

    eager = run(params, batch)
    compiled = torch.compile(run, fullgraph=True)(params, batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)


def test_compiled_transformer_gradients_equal_eager():
    model = Encoder().eval()
    batch = encoder_batch()
    spec = lf.logra(model, rank=4)
    params = params_of(model)
    eager = lf.projected_grads(model, params, batch, spec)
    run = torch.compile(lambda p, b: lf.projected_grads(model, p, b, spec), fullgraph=True)
    torch.testing.assert_close(run(params, batch), eager, rtol=1e-9, atol=1e-12)


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [n for n, _ in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        [m.training for m in model.modules()],
    )


def test_model_is_never_mutated():
    model = Encoder().eval()
    model.head.weight.requires_grad_(False)
    before = snapshot(model)
    spec = lf.logra(model, rank=4)
    lf.projected_grads(model, dict(model.named_parameters()), encoder_batch(), spec)
    lf.projected_grads(
        model, params_of(model), encoder_batch(), spec, return_activations=True, chunk_size=2
    )
    after = snapshot(model)
    assert before[1:] == after[1:]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_spec_for_another_model_is_refused():
    spec = lf.logra(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)), rank=2)
    batch = (torch.randn(3, 4), torch.randint(0, 2, (3,)))
    wider = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="spec layer '0' is a linear 4→5 .*another model"):
        lf.projected_grads(wider, params_of(wider), batch, spec)
    renamed = nn.Sequential()
    renamed.add_module("a", nn.Linear(4, 5))
    renamed.add_module("b", nn.Linear(5, 2))
    with pytest.raises(KeyError, match="spec layer '0' is not a module"):
        lf.projected_grads(renamed, params_of(renamed), batch, spec)
    with pytest.raises(TypeError, match="ProjectionSpec"):
        lf.projected_grads(wider, params_of(wider), batch, spec.to_dict())


def test_train_mode_batchnorm_and_dropout_are_refused():
    batch = (torch.randn(3, 4), torch.randint(0, 2, (3,)))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        lf.projected_grads(bn, params_of(bn), batch, lf.logra(bn, rank=2))
    drop = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    with pytest.raises(ValueError, match="active Dropout"):
        lf.projected_grads(drop, params_of(drop), batch, lf.logra(drop, rank=2))


def test_weight_used_outside_its_layer_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)

        def forward(self, ids):
            return self.emb(ids) @ self.emb.weight.T  # tied output layer, a matmul

    model = Tied()
    batch = (torch.randint(0, 6, (3, 2)), torch.randint(0, 6, (3, 2)))
    with pytest.raises(ValueError, match=r"\['emb'\] is used by Tensor.T"):
        lf.projected_grads(model, params_of(model), batch, lf.logra(model, rank=2))


def test_unused_layer_and_batch_not_first_are_refused():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    batch = (torch.randn(3, 4), torch.randint(0, 2, (3,)))
    with pytest.raises(ValueError, match=r"\['spare'\] were never called"):
        lf.projected_grads(model, params_of(model), batch, lf.logra(model, rank=2))

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x.transpose(0, 1)).transpose(0, 1)

    model = SeqFirst()
    batch = (torch.randn(3, 5, 4), torch.randint(0, 2, (3, 5)))
    with pytest.raises(ValueError, match="first dimension is not the batch"):
        lf.projected_grads(model, params_of(model), batch, lf.logra(model, rank=2))


def test_pca_spec_projects_with_its_stored_bases():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    batch = (torch.randn(4, 5), torch.randint(0, 3, (4,)))
    g = torch.Generator().manual_seed(1)
    covariances = {}
    for name, (n_in, n_out) in {"0": (6, 6), "2": (7, 3)}.items():
        a, s = torch.randn(n_in, n_in, generator=g), torch.randn(n_out, n_out, generator=g)
        covariances[name] = {"A": a @ a.T, "S": s @ s.T}
    spec = lf.logra(model, rank=2, init="pca", covariances=covariances)
    got = lf.projected_grads(model, params_of(model), batch, spec)
    expected = reference(model, batch, spec)
    for name in spec.layers:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
