"""capture: inputs, outputs, output gradients and watched tensors against a hooks reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

import logix_func as lf


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def mse(outputs, targets):
    return 0.5 * (outputs - targets).pow(2).sum()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False)

    def forward(self, x):
        return self.fc2(lf.watch("hidden", self.act(self.fc1(x))))


class Tokens(nn.Module):
    """Embedding → Linear over tokens; padded tokens are masked out of the loss."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(11, 6), nn.Linear(6, 11)

    def forward(self, input_ids, attention_mask):
        return self.proj(torch.tanh(self.emb(input_ids)))


def token_loss(outputs, labels):
    return F.cross_entropy(outputs.flatten(0, 1), labels.flatten(), reduction="sum")


def token_batch():
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def hooked(model, modules, run_loss):
    """Per-sample token views ``{name: (inputs [B,T,in], outputs [B,T,out], grads)}`` from
    forward hooks and one ``torch.autograd.grad`` of the summed loss."""
    seen, handles = {}, []
    for name in modules:

        def hook(m, args, y, name=name):
            seen[name] = (args[0].detach(), y)

        handles.append(dict(model.named_modules())[name].register_forward_hook(hook))
    try:
        loss = run_loss()
        grads = torch.autograd.grad(loss, [seen[n][1] for n in modules])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for (name, (x, y)), d in zip(seen.items(), grads, strict=True):
        module = dict(model.named_modules())[name]
        if isinstance(module, nn.Conv2d):
            x = F.unfold(x, module.kernel_size, padding=module.padding).transpose(1, 2)
            y, d = (t.flatten(2).transpose(1, 2) for t in (y, d))
        elif isinstance(module, nn.Embedding):
            x = F.one_hot(x, module.num_embeddings).to(y.dtype)
        b = x.shape[0]
        out[name] = tuple(t.detach().reshape(b, -1, t.shape[-1]) for t in (x, y, d))
    return out


def reduce_ref(t, mask, reduce):
    t = t * mask.unsqueeze(-1)
    if reduce == "sum":
        return t.sum(1)
    if reduce == "mean":
        return t.sum(1) / mask.sum(1, keepdim=True)
    return t


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
def test_mlp_layers_and_watch_equal_hooks(reduce):
    model = MLP().eval()
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    ref = hooked(model, ["fc1", "act", "fc2"], lambda: mse(model(x), y))
    got = lf.capture(model, params_of(model), (x, y), watch=True, loss_fn=mse, reduce=reduce)
    assert set(got) == {"fc1", "fc2", "hidden"}
    ones = torch.ones(4, 1)
    for name, key in (("fc1", "fc1"), ("fc2", "fc2"), ("hidden", "act")):
        inputs, outputs, grads = ref[key]
        want = {"outputs": outputs, "output_grads": grads}
        if name != "hidden":
            want["inputs"] = inputs
        assert set(got[name]) == set(want) | ({"mask"} if reduce is None else set())
        for kind, t in want.items():
            torch.testing.assert_close(got[name][kind], reduce_ref(t, ones, reduce))


class Checkpointed(MLP):
    """``fc1`` under non-reentrant checkpointing, or under ``torch.no_grad``."""

    def __init__(self, no_grad):
        super().__init__()
        self.no_grad = no_grad

    def forward(self, x):
        if self.no_grad:
            with torch.no_grad():
                h = self.fc1(x)
        else:
            h = checkpoint(self.fc1, x, use_reentrant=False)
        return self.fc2(lf.watch("hidden", self.act(h)))


def test_checkpointed_layer_equals_hooks_and_a_no_grad_layer_is_refused():
    plain, model = MLP().eval(), Checkpointed(no_grad=False).eval()
    model.load_state_dict(plain.state_dict())
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    ref = hooked(plain, ["fc1", "act"], lambda: mse(plain(x), y))
    got = lf.capture(model, params_of(model), (x, y), watch=True, loss_fn=mse, reduce=None)
    torch.testing.assert_close(got["fc1"]["output_grads"], ref["fc1"][2])
    torch.testing.assert_close(got["hidden"]["output_grads"], ref["act"][2])
    frozen = Checkpointed(no_grad=True).eval()
    with pytest.raises(RuntimeError, match="covered layer 'fc1' ran with gradients disabled"):
        lf.capture(frozen, params_of(frozen), (x, y), loss_fn=mse)
    out = lf.capture(frozen, params_of(frozen), (x, y), what=["inputs", "outputs"])
    assert set(out) == {"fc1", "fc2"}  # no backward: no gradient to miss


def test_conv2d_raw_patches_outputs_and_grads():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2))
    x, y = torch.randn(3, 2, 4, 4), torch.randn(3, 2)
    ref = hooked(model.eval(), ["0"], lambda: mse(model(x), y))
    got = lf.capture(model, params_of(model), (x, y), layers=["0"], loss_fn=mse, reduce=None)
    for kind, want in zip(("inputs", "outputs", "output_grads"), ref["0"], strict=True):
        torch.testing.assert_close(got["0"][kind], want)


def test_conv2d_projected_equals_explicit_projection():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)
    ).eval()
    x, y = torch.randn(3, 2, 4, 4), torch.randn(3, 2)
    spec = lf.logra(model, rank=(2, 5), seed=3)
    ref = hooked(model, ["0", "3"], lambda: mse(model(x), y))
    got = lf.capture(model, params_of(model), (x, y), project=spec, loss_fn=mse, reduce=None)
    for name in ("0", "3"):
        p_out, p_in = spec.matrices(name, dtype=torch.float64)
        inputs, outputs, grads = ref[name]
        with_ones = torch.cat([inputs, torch.ones(inputs.shape[:2] + (1,))], dim=-1)
        torch.testing.assert_close(got[name]["inputs"], with_ones @ p_in.T)
        torch.testing.assert_close(got[name]["outputs"], outputs @ p_out.T)
        torch.testing.assert_close(got[name]["output_grads"], grads @ p_out.T)
        assert got[name]["mask"].all()
        # the projected gradient is the sum over tokens of the outer products
        g = torch.einsum("btk,btj->bkj", got[name]["output_grads"], got[name]["inputs"])
        want = lf.projected_grads(model, params_of(model), (x, y), spec, loss_fn=mse)[name]
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
def test_token_model_with_padding_mask(reduce):
    model = Tokens().eval()
    batch = token_batch()
    mask = batch["attention_mask"].bool()
    run = lambda: token_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])  # noqa: E731
    ref = hooked(model, ["emb", "proj"], run)
    got = lf.capture(model, params_of(model), batch, loss_fn=token_loss, reduce=reduce)
    w = mask.to(torch.float64)
    for name in ("emb", "proj"):
        for kind, t in zip(("inputs", "outputs", "output_grads"), ref[name], strict=True):
            torch.testing.assert_close(got[name][kind], reduce_ref(t, w, reduce))
        if reduce is None:
            assert torch.equal(got[name]["mask"], mask)


def test_only_some_kinds_and_layers_without_backward():
    model = MLP().eval()
    x = torch.randn(4, 5)
    ref = hooked(model, ["fc2"], lambda: model(x).sum())
    got = lf.capture(
        model, params_of(model), (x, torch.randn(4, 3)), layers=["fc2"], what=["inputs"]
    )
    assert set(got) == {"fc2"} and set(got["fc2"]) == {"inputs"}
    torch.testing.assert_close(got["fc2"]["inputs"], ref["fc2"][0].sum(1))


def test_compiled_equals_eager():
    model = MLP().eval()
    batch = (torch.randn(4, 5), torch.randn(4, 3))
    spec = lf.logra(model, rank=2, seed=1)

    def run(p, b):
        return lf.capture(model, p, b, project=spec, watch=["hidden"], loss_fn=mse, reduce=None)

    eager = run(params_of(model), batch)
    compiled = torch.compile(run, fullgraph=True)(params_of(model), batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)


def test_vmap_over_weights_equals_one_call_per_weights():
    model = MLP().eval()
    batch = (torch.randn(4, 5), torch.randn(4, 3))
    params = params_of(model)
    spec = lf.logra(model, rank=2)

    def run(p):
        return lf.capture(model, p, batch, project=spec, watch=True, loss_fn=mse, reduce=None)

    batched = torch.func.vmap(run)({n: torch.stack([p, 2 * p]) for n, p in params.items()})
    for i, scale in enumerate((1, 2)):
        one = run({n: scale * p for n, p in params.items()})
        torch.testing.assert_close(tree_map(lambda t, i=i: t[i], batched), one)


def test_compiled_token_model_without_projection_equals_eager():
    model = Tokens().eval()
    batch = token_batch()

    def run(p, b):
        return lf.capture(model, p, b, loss_fn=token_loss, reduce="mean")

    eager = run(params_of(model), batch)
    compiled = torch.compile(run, fullgraph=True)(params_of(model), batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)


def test_watch_is_the_identity_outside_capture_and_model_untouched():
    model = MLP().eval()
    x = torch.randn(4, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(model(x), model.fc2(torch.tanh(model.fc1(x))))
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
    batch = (x, torch.randn(4, 3))
    lf.capture(model, params_of(model), batch, watch=True, loss_fn=mse)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # projected_grads passes watch calls through
    full = lf.projected_grads(model, params_of(model), batch, lf.logra(model, None), loss_fn=mse)
    want = lf.per_sample_grads(model, params_of(model), batch, loss_fn=mse)["fc2.weight"]
    torch.testing.assert_close(full["fc2"], want)
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_are_named():
    model = MLP().eval()
    batch = (torch.randn(4, 5), torch.randn(4, 3))
    with pytest.raises(ValueError, match="what must be"):
        lf.capture(model, params_of(model), batch, what=["activations"])
    with pytest.raises(KeyError, match="not projectable"):
        lf.capture(model, params_of(model), batch, layers=["act"])
    with pytest.raises(ValueError, match="outputs and output_grads only"):
        lf.capture(model, params_of(model), batch, what=["inputs"], watch=True)
    with pytest.raises(ValueError, match="never passed to watch"):
        lf.capture(model, params_of(model), batch, layers=[], watch=["nope"], loss_fn=mse)
    with pytest.raises(KeyError, match="not in the projection spec"):
        lf.capture(
            model,
            params_of(model),
            batch,
            layers=["fc2"],
            project=lf.logra(model, 2, layers=["fc1"]),
        )


def test_store_round_trip(tmp_path):
    model = Tokens().eval()
    params = params_of(model)
    spec = lf.logra(model, rank=3)
    batches = [token_batch(), token_batch()]
    caps = [
        lf.capture(model, params, b, project=spec, loss_fn=token_loss, reduce=None) for b in batches
    ]
    grads = [lf.projected_grads(model, params, b, spec, loss_fn=token_loss) for b in batches]
    schema = lf.store_schema(model, spec, torch.float32, captures=caps[0])
    assert schema.layers["proj.output_grads"] == (5, 3) and schema.layers["emb.mask"] == (5,)
    store = lf.LogStore.create(str(tmp_path / "log"), schema)
    for i, (c, g) in enumerate(zip(caps, grads, strict=True)):
        rows = {**g, **lf.flatten_capture(c)}
        store.append(torch.arange(3 * i, 3 * i + 3), {k: v.float() for k, v in rows.items()})
    store.flush()
    rows = lf.LogStore.open(str(tmp_path / "log")).read(torch.arange(6))
    back = lf.unflatten_capture(rows)
    assert set(back) == {"emb", "proj"}
    for name in ("emb", "proj"):
        for kind in ("inputs", "outputs", "output_grads"):
            want = torch.cat([c[name][kind] for c in caps]).float()
            torch.testing.assert_close(back[name][kind], want)
        assert torch.equal(back[name]["mask"], torch.cat([c[name]["mask"] for c in caps]))
    torch.testing.assert_close(rows["proj"], torch.cat([g["proj"] for g in grads]).float())


def test_statistics_of_captures_equal_numpy():
    model = Tokens().eval()
    params = params_of(model)
    cov, var = lf.running_covariance(), lf.running_variance()
    state_c = state_v = None
    tokens, sums = [], []
    for _ in range(3):
        c = lf.capture(
            model, params, token_batch(), layers=["proj"], loss_fn=token_loss, reduce=None
        )
        per_sample = lf.capture(model, params, token_batch(), layers=["proj"], what=["outputs"])
        if state_c is None:
            state_c = cov.init((6,), device="cpu")
            state_v = var.init(per_sample["proj"], device="cpu")
        state_c = cov.update(state_c, c["proj"]["inputs"], mask=c["proj"]["mask"])
        state_v = var.update(state_v, per_sample["proj"])
        tokens.append(c["proj"]["inputs"][c["proj"]["mask"]].numpy())
        sums.append(per_sample["proj"]["outputs"].numpy())
    rows = np.concatenate(tokens)
    np.testing.assert_allclose(cov.finalize(state_c).numpy(), np.cov(rows.T, bias=True), atol=1e-12)
    np.testing.assert_allclose(
        var.finalize(state_v)["outputs"].numpy(), np.concatenate(sums).var(0), atol=1e-12
    )
