"""Inputs shared by every sample (nanoGPT's ``self.wpe(torch.arange(t))``) against a for-loop of
torch.autograd.grad over samples, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix_func as lf


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.proj = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)  # broadcast mask
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """Written the nanoGPT way: position ids ``(T,)`` shared by the samples, tied head."""

    def __init__(self, vocab: int = 11, dim: int = 8, context: int = 16, pos_shape: str = "t"):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.h = nn.Sequential(Block(dim, 2))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        self.pos_shape = pos_shape

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long)  # shape (t)
        pos = pos if self.pos_shape == "t" else pos.unsqueeze(0)  # or [1, t]
        x = self.wte(idx) + self.wpe(pos)
        return self.lm_head(self.ln_f(self.h(x)))


def token_ce(outputs, targets):
    return F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="sum")


def batch_of(b=3, t=5, vocab=11):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(
        0, vocab, (b, t), generator=g
    )


def loop_grads(model, batch):
    """``{weight or bias: [B, *shape]}``: one torch.autograd.grad per sample."""
    params = dict(model.named_parameters())
    out = []
    for x, y in zip(*batch, strict=True):
        loss = token_ce(model(x[None])[0], y)
        out.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
    return {n: torch.stack([o[n] for o in out]) for n in params}


def reference(model, batch, spec):
    """``P_out G_b P_inᵀ`` of every layer, from the loop's gradients (dense matrices)."""
    full = loop_grads(model, batch)
    out = {}
    for name, layer in spec.layers.items():
        g = full[layer.weight]
        g = g.transpose(1, 2) if layer.kind == "embedding" else g
        if layer.bias is not None:
            g = torch.cat([g, full[layer.bias].unsqueeze(-1)], dim=-1)
        p_out, p_in = spec.matrices(name, dtype=torch.float64)
        out[name] = p_out @ g @ p_in.T
    return out


def params_of(model):
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pos_shape", ["t", "1t"])
@pytest.mark.parametrize("rank", [3, None])
def test_shared_position_ids_equal_per_sample_loop(pos_shape, rank):
    model = NanoGPT(pos_shape=pos_shape).eval()
    batch = batch_of()
    spec = lf.logra(model, rank=rank, seed=3)
    assert "wpe" in spec.layers
    expected = reference(model, batch, spec)
    got = lf.projected_grads(model, params_of(model), batch, spec, loss_fn=token_ce)
    for name in spec.layers:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
    # a batch whose size is 1 and one that does not divide the tokens
    for b in (1, 4):
        one = batch_of(b=b)
        torch.testing.assert_close(
            lf.projected_grads(model, params_of(model), one, spec, loss_fn=token_ce),
            reference(model, one, spec),
            rtol=1e-10,
            atol=1e-12,
        )


def test_shared_inputs_in_capture_and_curvature_logs():
    model = NanoGPT().eval()
    batch = batch_of()
    full = loop_grads(model, batch)
    got = lf.capture(model, params_of(model), batch, layers=["wpe"], reduce=None, loss_fn=token_ce)
    # position t reads row t of wpe once: its output gradient is that row's gradient
    torch.testing.assert_close(
        got["wpe"]["output_grads"], full["wpe.weight"][:, :5], rtol=1e-10, atol=1e-12
    )
    inputs = got["wpe"]["inputs"]  # one-hot position ids, the same for every sample
    torch.testing.assert_close(inputs, torch.eye(16)[:5].expand(3, 5, 16))
    spec = lf.logra(model, rank=3)
    grads, logs = lf.fisher_logs(
        model, params_of(model), batch, spec, fisher="empirical", loss_fn=token_ce
    )
    expected = reference(model, batch, spec)
    for name in spec.layers:
        torch.testing.assert_close(grads[name][:, 0], expected[name], rtol=1e-10, atol=1e-12)
    assert logs["wpe"]["activations"].shape == (3, 5, 3)


def test_shared_position_ids_compiled_fullgraph_equal_eager():
    model = NanoGPT().eval()
    batch = batch_of()
    spec = lf.logra(model, rank=3)
    params = params_of(model)

    def run(p, b):
        return lf.projected_grads(model, p, b, spec, loss_fn=token_ce, return_activations=True)

    eager = run(params, batch)
    compiled = torch.compile(run, fullgraph=True)(params, batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(eager[0], reference(model, batch, spec), rtol=1e-10, atol=1e-12)


def test_shared_table_and_unbatched_vector_inputs():
    class Shared(nn.Module):
        """A linear layer on a ``(T, in)`` table and one on an ``(in,)`` vector."""

        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, 3))
            self.vec = nn.Parameter(torch.randn(3))
            self.per_token, self.per_sample = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):  # x [B, 4, 2]
            return x * self.per_token(self.table) + self.per_sample(self.vec)[..., None, :]

    model = Shared().eval()
    batch = (torch.randn(5, 4, 2), torch.randn(5, 4, 2))

    def mse(out, y):
        return 0.5 * (out - y).pow(2).sum()

    spec = lf.logra(model, rank=None)
    got = lf.projected_grads(model, params_of(model), batch, spec, loss_fn=mse)
    expected = lf.per_sample_grads(model, params_of(model), batch, loss_fn=mse)
    for name in ("per_token", "per_sample"):
        g = torch.cat([expected[f"{name}.weight"], expected[f"{name}.bias"][..., None]], -1)
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12)
