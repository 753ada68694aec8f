"""fisher='true' with a custom loss and the user's label sampler, against the built-in draw and
against the exact Fisher (the expectation over every label)."""

import pytest
import torch
from torch import nn

import logix_func as lf


def ce(outputs, targets):
    """A custom loss: cross-entropy written by hand, summed over tokens."""
    logp = outputs.log_softmax(-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).sum()


def categorical(outputs, targets, generator):
    """The user's sampler: one label per row of logits, from their softmax."""
    probs = outputs.softmax(-1).reshape(-1, outputs.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).reshape(targets.shape)


class TokenModel(nn.Module):
    def __init__(self, vocab=7, dim=6):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def case(kind):
    torch.manual_seed(0)
    if kind == "classification":
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
        return model, (torch.randn(16, 5), torch.randint(0, 4, (16,)))
    ids = torch.randint(0, 7, (6, 5))
    return TokenModel(), (ids, torch.roll(ids, -1, dims=1))


@pytest.mark.parametrize("kind", ["classification", "token"])
def test_custom_loss_and_sampler_equal_the_built_in_true_fisher(kind):
    model, batch = case(kind)
    params = {n: p.detach() for n, p in model.named_parameters()}
    spec = lf.logra(model, rank=3, seed=1)
    built_in = lf.fisher_logs(model, params, batch, spec, fisher="true", seed=5)
    custom = lf.fisher_logs(
        model, params, batch, spec, fisher="true", seed=5, loss_fn=ce, label_sampler=categorical
    )
    torch.testing.assert_close(custom, built_in, rtol=1e-5, atol=1e-6)
    auto = lf.fisher_logs(
        model, params, batch, spec, fisher="auto", seed=5, loss_fn=ce, label_sampler=categorical
    )
    torch.testing.assert_close(auto, custom)  # a sampler makes "auto" draw with it
    empirical = lf.fisher_logs(model, params, batch, spec, fisher="empirical", loss_fn=ce)
    last = "2" if kind == "classification" else "head"
    assert not torch.allclose(custom[0][last], empirical[0][last])  # the labels were drawn
    factors = {
        name: lf.fit_curvature(
            model, params, [batch, batch], spec, method="ekfac", progress=False, **kw
        )
        for name, kw in (
            ("built-in", {"fisher": "true"}),
            ("custom", {"fisher": "true", "loss_fn": ce, "label_sampler": categorical}),
        )
    }
    torch.testing.assert_close(
        factors["custom"]["layers"], factors["built-in"]["layers"], rtol=1e-4, atol=1e-6
    )


def test_many_sampled_labels_approach_the_exact_fisher():
    model, (x, y) = case("classification")
    x, y = x[:6], y[:6]
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    model = model.double()
    spec = lf.logra(model, rank=None, layers=["2"])
    copies = 3000
    many = (x.double().repeat(copies, 1), y.repeat(copies))
    grads, _ = lf.fisher_logs(
        model, params, many, spec, fisher="true", seed=0, loss_fn=ce, label_sampler=categorical
    )
    g = grads["2"][:, 0].reshape(copies, 6, -1)
    sampled = torch.einsum("rbi,rbj->bij", g, g) / copies  # E over drawn labels of g gᵀ
    exact, _ = lf.fisher_logs(model, params, (x.double(), y), spec, fisher="exact")
    e = exact["2"].flatten(2)  # [B, classes, D]: Σ_c v_c v_cᵀ = the label expectation
    expected = torch.einsum("bci,bcj->bij", e, e)
    error = torch.linalg.norm(sampled - expected) / torch.linalg.norm(expected)
    assert error < 0.06, error


def test_custom_loss_without_sampler_and_bad_samplers_are_named():
    model, batch = case("classification")
    params = {n: p.detach() for n, p in model.named_parameters()}
    spec = lf.logra(model, rank=2)
    for fisher in ("true", "auto"):
        with pytest.raises(ValueError, match="pass label_sampler="):
            lf.fisher_logs(model, params, batch, spec, fisher=fisher, loss_fn=ce)
    with pytest.raises(ValueError, match=r"label_sampler returned \(\(16, 1\)"):
        lf.fisher_logs(
            model, params, batch, spec, fisher="true", loss_fn=ce,
            label_sampler=lambda out, t, g: categorical(out, t, g)[:, None],
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"fisher='true' \(or 'auto'\) only"):
        lf.fisher_logs(model, params, batch, spec, fisher="empirical", label_sampler=categorical)


def test_cached_factors_are_keyed_by_the_sampler(tmp_path):
    model, batch = case("classification")
    params = {n: p.detach() for n, p in model.named_parameters()}
    spec = lf.logra(model, rank=2)
    kw = dict(method="kfac", fisher="true", loss_fn=ce, progress=False, cache=str(tmp_path))
    fresh = lf.fit_curvature(model, params, [batch], spec, label_sampler=categorical, **kw)
    again = lf.fit_curvature(model, params, [batch], spec, label_sampler=categorical, **kw)
    torch.testing.assert_close(again["layers"], fresh["layers"])
    plain = lf.fit_curvature(
        model, params, [batch], spec, method="kfac", fisher="true", progress=False
    )
    torch.testing.assert_close(fresh["layers"], plain["layers"])  # the built-in draw

    def first_class(outputs, targets, generator):
        return torch.zeros_like(targets)

    other = lf.fit_curvature(model, params, [batch], spec, label_sampler=first_class, **kw)
    assert not torch.allclose(other["layers"]["2"]["S"], fresh["layers"]["2"]["S"])
    assert len(list(tmp_path.iterdir())) == 2
