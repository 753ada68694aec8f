"""EKFAC's eigenvalues from the token logs against dense per-sample references."""

import pytest
import torch
from torch import nn

import logix_func as lf
from logix_func.curvature._ekfac import tokens_are_cheaper


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class TokenModel(nn.Module):
    """Embedding, a per-token Linear, a causal running sum over the tokens, a Linear head."""

    def __init__(self, vocab=6, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.lin(self.emb(input_ids))).cumsum(1))


def token_batch():
    ids = torch.randint(0, 6, (5, 4))
    mask = torch.ones(5, 4, dtype=torch.long)
    mask[0, 2:] = 0
    mask[3, 1:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def conv():
    return nn.Sequential(nn.Conv2d(4, 8, 2), nn.Flatten(), nn.Linear(32, 3))


def layer_grads(model, param_grads):
    """``{layer: [B, k_out, k_in]}`` in the full-rank layout: ``[W | b]``, Embedding ``Wᵀ``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            out[name] = param_grads[f"{name}.weight"].transpose(1, 2)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            w = param_grads[f"{name}.weight"].flatten(2)
            out[name] = torch.cat([w, param_grads[f"{name}.bias"][:, :, None]], 2)
    return out


def kfac_of(model, batch, fisher, dtype=torch.float64):
    params = dict(model.named_parameters())
    spec = lf.logra(model, rank=None)
    k = lf.kfac(fisher, dtype=dtype)
    _, logs = lf.fisher_logs(model, params, batch, spec, fisher=fisher, seed=7)
    return params, spec, k.finalize(k.update(k.init(spec), logs))


def eigenvalues_from_logs(model, batch, fisher):
    """EKFAC through ``update(state, grads, logs)``; asserts the token route is the cheaper."""
    params, spec, factors = kfac_of(model, batch, fisher)
    grads, logs = lf.fisher_logs(model, params, batch, spec, fisher=fisher, seed=7)
    for name, g in grads.items():
        tokens = logs[name]["activations"].shape[1]
        assert tokens_are_cheaper(g.shape[1], tokens, *g.shape[-2:]), name
    e = lf.ekfac(factors)
    return factors, e.finalize(e.update(e.init(), grads, logs))


def dense_eigenvalues(factors, grads):
    """``mean_n (Q_Sᵀ G_n Q_A)²``, one sample at a time."""
    out = {}
    for name, g in grads.items():
        f = factors["layers"][name]
        out[name] = sum((f["QS"].T @ gn @ f["QA"]) ** 2 for gn in g) / len(g)
    return out


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize(
    "make_model, make_batch",
    [
        (mlp, lambda: (torch.randn(20, 6), torch.randint(0, 4, (20,)))),
        (TokenModel, token_batch),
        (conv, lambda: (torch.randn(6, 4, 3, 3), torch.randint(0, 3, (6,)))),
    ],
    ids=["mlp", "tokens-padded", "conv2d"],
)
def test_eigenvalues_from_logs_match_per_sample_gradients(fisher, make_model, make_batch):
    model, batch = make_model(), make_batch()
    factors, got = eigenvalues_from_logs(model, batch, fisher)
    params = dict(model.named_parameters())
    labelled = lf.sample_targets(model, params, batch, seed=7) if fisher == "true" else batch
    want = dense_eigenvalues(
        factors, layer_grads(model, lf.per_sample_grads(model, params, labelled))
    )
    assert set(got["layers"]) == set(want)
    for name, expected in want.items():
        torch.testing.assert_close(got["layers"][name]["eigenvalues"], expected)


def test_exact_fisher_eigenvalues_from_logs_match_the_dense_gauss_newton():
    """Σ_c (q_Sᵀ G_c q_A)² summed over the classes is the GGN ``Jᵀ H J`` in the rotated basis."""
    model = mlp()
    x, y = torch.randn(20, 6), torch.randint(0, 4, (20,))
    factors, got = eigenvalues_from_logs(model, (x, y), "exact")
    params = dict(model.named_parameters())
    p = model(x).softmax(-1).detach()
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    for name in ("0", "2"):
        m = model.get_submodule(name)
        wb = torch.cat([m.weight, m.bias[:, None]], 1).detach()

        def logits(wb, xi, name=name):
            p = {**params, f"{name}.weight": wb[:, :-1], f"{name}.bias": wb[:, -1]}
            return torch.func.functional_call(model, p, (xi[None],))[0]

        jac = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(wb, x)  # [N,C,o,i]
        f = factors["layers"][name]
        rotated = f["QS"].T @ jac @ f["QA"]
        expected = torch.einsum("ncoi,ncd,ndoi->oi", rotated, hess, rotated) / len(x)
        torch.testing.assert_close(got["layers"][name]["eigenvalues"], expected)


@pytest.mark.parametrize(
    "make_model, make_batch, fisher",
    [
        (mlp, lambda: (torch.randn(30, 6), torch.randint(0, 4, (30,))), "exact"),
        (mlp, lambda: (torch.randn(30, 6), torch.randint(0, 4, (30,))), "true"),
        (TokenModel, token_batch, "true"),
        (conv, lambda: (torch.randn(6, 4, 3, 3), torch.randint(0, 3, (6,))), "empirical"),
    ],
    ids=["mlp-exact", "mlp-true", "tokens-padded", "conv2d"],
)
def test_route_does_not_change_the_eigenvalues_in_float32(make_model, make_batch, fisher):
    torch.set_default_dtype(torch.float32)
    model, batch = make_model(), make_batch()
    params, spec, factors = kfac_of(model, batch, fisher, dtype=torch.float32)
    grads, logs = lf.fisher_logs(model, params, batch, spec, fisher=fisher, seed=7)
    e = lf.ekfac(factors)
    from_logs = e.finalize(e.update(e.init(), grads, logs))
    from_grads = e.finalize(e.update(e.init(), grads))
    for name, layer in from_grads["layers"].items():
        torch.testing.assert_close(
            from_logs["layers"][name]["eigenvalues"], layer["eigenvalues"], rtol=1e-5, atol=1e-7
        )


def test_cost_model_prefers_gradients_for_long_sequences_of_small_layers():
    assert tokens_are_cheaper(draws=10, tokens=1, k_out=32, k_in=65)
    assert tokens_are_cheaper(draws=1, tokens=4, k_out=64, k_in=64)
    assert not tokens_are_cheaper(draws=1, tokens=512, k_out=8, k_in=8)


def test_logs_of_another_batch_are_refused():
    model = mlp()
    params, spec, factors = kfac_of(model, (torch.randn(8, 6), torch.randint(0, 4, (8,))), "true")
    grads, _ = lf.fisher_logs(model, params, (torch.randn(8, 6), torch.randint(0, 4, (8,))), spec)
    _, logs = lf.fisher_logs(model, params, (torch.randn(5, 6), torch.randint(0, 4, (5,))), spec)
    e = lf.ekfac(factors)
    with pytest.raises(ValueError, match="pass the logs of the same batch"):
        e.update(e.init(), grads, logs)
    with pytest.raises(ValueError, match="logged layers"):
        e.update(e.init(), grads, {"0": logs["0"]})


def test_update_with_logs_compiles_fullgraph():
    model = mlp()
    batch = (torch.randn(12, 6), torch.randint(0, 4, (12,)))
    params, spec, factors = kfac_of(model, batch, "exact")
    grads, logs = lf.fisher_logs(model, params, batch, spec, fisher="exact")
    e = lf.ekfac(factors)
    compiled = torch.compile(e.update, fullgraph=True)
    got, want = compiled(e.init(), grads, logs), e.update(e.init(), grads, logs)
    for name, layer in want["layers"].items():
        torch.testing.assert_close(got["layers"][name]["squares"], layer["squares"])
