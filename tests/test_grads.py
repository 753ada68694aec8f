"""per_sample_grads against a Python loop of torch.autograd.grad, one sample at a time."""

import copy
import weakref
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Shaped, TypeCheckError, jaxtyped
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from logix_func import per_sample_grads

B = 5


def loop_grads(model, names, loss_of_sample, n=B):
    """Reference: ``torch.autograd.grad`` of ``loss_of_sample(i)`` w.r.t. the model's ``names``."""
    named = dict(model.named_parameters())
    rows = [torch.autograd.grad(loss_of_sample(i), [named[k] for k in names]) for i in range(n)]
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


def assert_grads_equal(got, want, **tol):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def all_params(model):
    return dict(model.named_parameters())


# ---------------------------------------------------------------- models


class Attention(nn.Module):
    """Multi-head self-attention written with F.scaled_dot_product_attention."""

    def __init__(self, d, heads, causal):
        super().__init__()
        self.qkv, self.out, self.heads, self.causal = (
            nn.Linear(d, 3 * d),
            nn.Linear(d, d),
            heads,
            causal,
        )

    def forward(self, x, key_mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if key_mask is not None:
            keys = key_mask.bool()[:, None, None, :]
            mask = keys if mask is None else mask & keys
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d=16, heads=2, causal=False):
        super().__init__()
        self.ln1, self.attn, self.ln2 = (
            nn.LayerNorm(d),
            Attention(d, heads, causal),
            nn.LayerNorm(d),
        )
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, key_mask=None):
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


@dataclass
class LMOutput:
    logits: torch.Tensor


class TinyForCausalLM(nn.Module):
    """Hugging Face shaped: keyword inputs, ``.logits`` output, next-token labels (shifted)."""

    def __init__(self, vocab=11, d=16, tie=False):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.1 * torch.randn(8, d))
        self.block, self.norm = Block(d, causal=True), nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        return LMOutput(self.lm_head(self.norm(self.block(x, attention_mask))))


class TinyTokenTagger(TinyForCausalLM):
    """Same network, but its class name says the labels are not shifted."""


def lm_batch(vocab=11, t=6):
    lengths = torch.tensor([6, 4, 2, 5, 1])
    mask = (torch.arange(t) < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (B, t)).masked_fill(mask == 0, 0)
    labels = ids.clone()
    labels[0, 2] = labels[3, 4] = -100  # ignored inside the sequence; padding keeps its id 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_reference_loss(logits, labels, mask, shift):
    """Summed token cross-entropy of one sample written out: valid = label set and attended."""
    logp = logits[0].log_softmax(-1)
    labels, mask = labels[0], mask[0]
    if shift:
        logp, labels, mask = logp[:-1], labels[1:], mask[1:]
    total = 0.0 * logits.sum()  # keeps the graph when no token counts
    for pos in range(labels.shape[0]):
        if labels[pos] != -100 and mask[pos] == 1:
            total = total - logp[pos, labels[pos]]
    return total


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["classes", "regression"])
def test_mlp(kind):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3 if kind == "classes" else 1))
    model.double()
    x = torch.randn(B, 6, dtype=torch.float64)
    if kind == "classes":
        y = torch.randint(0, 3, (B,))

        def ref(i):
            return F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
    else:
        y = torch.randn(B, dtype=torch.float64)

        def ref(i):
            return 0.5 * (model(x[i : i + 1])[0, 0] - y[i]) ** 2

    want = loop_grads(model, list(all_params(model)), ref)
    assert_grads_equal(per_sample_grads(model, all_params(model), (x, y)), want)
    assert_grads_equal(per_sample_grads(model, all_params(model), (x, y), strategy="loop"), want)


def test_data_dependent_branch_falls_back_to_a_loop_unless_vmap_is_asked_for():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)  # branches on the values

    model = Gate().double()
    x = torch.tensor([[1.0, 2, 3], [-1, -2, -3], [0.5, -4, 1]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])

    def ref(i):
        return F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")

    want = loop_grads(model, list(all_params(model)), ref, n=3)
    with pytest.warns(UserWarning, match="falls back to one gradient per sample"):
        assert_grads_equal(per_sample_grads(model, all_params(model), (x, y)), want)
    with pytest.raises(RuntimeError, match="data-dependent Python control flow"):
        per_sample_grads(model, all_params(model), (x, y), strategy="vmap")
    with pytest.raises(ValueError, match="strategy must be"):
        per_sample_grads(model, all_params(model), (x, y), strategy="jit")


def test_cnn_with_groupnorm():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()
    x, y = torch.randn(B, 2, 7, 7, dtype=torch.float64), torch.randint(0, 3, (B,))
    got = per_sample_grads(model, all_params(model), (x, y))

    def ref(i):
        return F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")

    assert_grads_equal(got, loop_grads(model, list(all_params(model)), ref))


class EncoderClassifier(nn.Module):
    """Embedding + nn.TransformerEncoderLayer (nn.MultiheadAttention inside) + linear head."""

    def __init__(self, vocab=13, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        h = self.layer(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head((h * attention_mask[..., None]).sum(1))


def test_transformer_encoder_layer():
    model = EncoderClassifier().double().eval()
    ids = torch.randint(0, 13, (B, 6))
    mask = (torch.arange(6) < torch.tensor([6, 3, 5, 1, 4])[:, None]).long()
    y = torch.randint(0, 3, (B,))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}  # one label per sequence
    got = per_sample_grads(model, all_params(model), batch)

    def ref(i):
        out = model(ids[i : i + 1], mask[i : i + 1])
        return F.cross_entropy(out, y[i : i + 1], reduction="sum")

    assert "layer.self_attn.in_proj_weight" in got
    assert_grads_equal(got, loop_grads(model, list(all_params(model)), ref))


def test_sdpa_block_with_token_targets_and_ignore_index():
    model = nn.Sequential(Block(16, heads=4, causal=True), nn.Linear(16, 7)).double()
    x = torch.randn(B, 6, 16, dtype=torch.float64)
    y = torch.randint(0, 7, (B, 6))
    y[1, :3] = -100
    y[4] = -100  # a sample without any counted token has zero gradient
    got = per_sample_grads(model, all_params(model), (x, y))

    def ref(i):
        logp = model(x[i : i + 1])[0].log_softmax(-1)
        return -sum(logp[t, y[i, t]] for t in range(6) if y[i, t] != -100)

    want = loop_grads(model, list(all_params(model)), ref, n=4)
    got4 = {k: v[:4] for k, v in got.items()}
    assert_grads_equal(got4, want)
    assert all(torch.all(v[4] == 0) for v in got.values())


@pytest.mark.parametrize("cls", [TinyForCausalLM, TinyTokenTagger])
def test_language_model_loss_with_padding(cls):
    model = cls().double()
    batch = lm_batch()
    got = per_sample_grads(model, all_params(model), batch)
    shift = cls is TinyForCausalLM

    def ref(i):
        ids, mask, labels = (batch[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels"))
        return lm_reference_loss(model(ids, mask).logits, labels, mask, shift)

    assert_grads_equal(got, loop_grads(model, list(all_params(model)), ref))


def test_tied_weights_sum_both_uses():
    model = TinyForCausalLM(tie=True).double()
    params = all_params(model)
    assert "embed.weight" in params and "lm_head.weight" not in params
    batch = lm_batch()
    got = per_sample_grads(model, params, batch)

    def ref(i):
        ids, mask, labels = (batch[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels"))
        return lm_reference_loss(model(ids, mask).logits, labels, mask, shift=True)

    want = loop_grads(model, list(params), ref)
    assert_grads_equal(got, want)
    # the head's use alone is a different gradient: both uses are really in the sum
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
    head_only = per_sample_grads(untied, {"lm_head.weight": untied.lm_head.weight}, batch)
    assert not torch.allclose(head_only["lm_head.weight"], got["embed.weight"])


def test_parameter_subset_uses_given_values_and_keeps_others_fixed():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new_weight = 2.0 * model[2].weight.detach()
    x, y = torch.randn(B, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    got = per_sample_grads(model, {"2.weight": new_weight}, (x, y))

    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[2].weight.copy_(new_weight)

    def ref(i):
        return F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1], reduction="sum")

    assert list(got) == ["2.weight"]
    assert_grads_equal(got, loop_grads(reference, ["2.weight"], ref))
    for k, v in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in model.parameters())


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) * self.b(z)


def test_inputs_as_tuple_of_tensors():
    model = TwoInputs().double()
    x, z = torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (B,))
    got = per_sample_grads(model, all_params(model), ((x, z), y))

    def ref(i):
        return F.cross_entropy(model(x[i : i + 1], z[i : i + 1]), y[i : i + 1], reduction="sum")

    assert_grads_equal(got, loop_grads(model, list(all_params(model)), ref))


@pytest.mark.parametrize("explicit", [False, True])
def test_batchnorm_eval_with_model_or_explicit_buffers(explicit):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model.double().eval()
    x, y = torch.randn(B, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    buffers, reference = None, model
    if explicit:
        buffers = {
            "1.running_mean": torch.randn(6, dtype=torch.float64),
            "1.running_var": torch.rand(6, dtype=torch.float64) + 0.5,
        }
        reference = copy.deepcopy(model)
        reference.load_state_dict(buffers, strict=False)
    got = per_sample_grads(model, all_params(model), (x, y), buffers=buffers)

    def ref(i):
        return F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1], reduction="sum")

    assert_grads_equal(got, loop_grads(reference, list(all_params(model)), ref))
    assert torch.all(model[1].running_var == 1) and model[1].num_batches_tracked == 0


def test_custom_loss_fn():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(B, 4, dtype=torch.float64), torch.randint(0, 3, (B,))

    def loss_fn(outputs, targets):
        return F.cross_entropy(outputs, targets, label_smoothing=0.2, reduction="sum")

    got = per_sample_grads(model, all_params(model), (x, y), loss_fn=loss_fn)
    want = loop_grads(
        model, list(all_params(model)), lambda i: loss_fn(model(x[i : i + 1]), y[i : i + 1])
    )
    assert_grads_equal(got, want)


def test_chunk_size_gives_the_same_result():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    whole = per_sample_grads(model, all_params(model), (x, y))
    for chunk in (1, 3, 7, 100):
        assert_grads_equal(
            per_sample_grads(model, all_params(model), (x, y), chunk_size=chunk), whole
        )


# ---------------------------------------------------------------- dropout policy


def dropout_mlp():
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 3))


def test_active_dropout_is_refused_by_default():
    model = dropout_mlp().train()
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    with pytest.raises(ValueError, match=r"'2' is an active Dropout.*model.eval\(\)"):
        per_sample_grads(model, all_params(model), (x, y))


def test_dropout_with_different_randomness_draws_a_mask_per_sample():
    model = dropout_mlp()
    x, y = torch.randn(1, 4).expand(B, 4), torch.tensor([1]).expand(B)  # B copies of one sample
    deterministic = per_sample_grads(model.eval(), all_params(model), (x, y))["3.weight"]
    model.train()
    different = per_sample_grads(model, all_params(model), (x, y), randomness="different")[
        "3.weight"
    ]
    same = per_sample_grads(model, all_params(model), (x, y), randomness="same")["3.weight"]
    assert torch.isfinite(different).all()
    assert not torch.allclose(different, deterministic)
    assert not torch.allclose(different[0], different[1])  # masks differ between samples
    assert torch.equal(same, same[:1].expand_as(same))  # one mask shared by the batch
    # a dropped hidden unit zeroes its whole column of the head's gradient; about half are dropped
    zero = different == 0
    assert torch.equal(zero.all(1), zero.any(1))
    assert 0.25 < zero.all(1).float().mean() < 0.75


def test_functional_dropout_in_forward_gets_a_clear_error():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(F.dropout(x, 0.5, training=True))

    model = Net().eval()
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    with pytest.raises(RuntimeError, match=r"draws random numbers.*randomness='different'"):
        per_sample_grads(model, all_params(model), (x, y))
    got = per_sample_grads(model, all_params(model), (x, y), randomness="different")
    assert torch.isfinite(got["lin.weight"]).all()


# ---------------------------------------------------------------- memory


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while the mode is on.

    A storage counts from the op that creates it until it is freed (a weakref finalizer on it);
    inputs made before the mode are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.sizes = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.live -= self.sizes.pop(key)


def test_chunk_size_bounds_peak_memory():
    # 8 x 32 x 32 activations per sample and layer against ~700 parameters
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    params = all_params(model)
    x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 3, (32,))
    peaks = {}
    for chunk in (None, 1):
        with LiveBytes() as tracker:
            grads = per_sample_grads(model, params, (x, y), chunk_size=chunk)
        peaks[chunk] = tracker.peak
        result = sum(g.numel() * g.element_size() for g in grads.values())
        del grads
    one_sample_activation = 8 * 32 * 32 * 4
    assert peaks[None] > 32 * one_sample_activation  # the whole batch's activations at once
    assert peaks[1] < peaks[None] / 8
    assert peaks[1] < result + 16 * one_sample_activation


def test_chunks_are_written_into_one_output():
    # the gradients dominate here: peak = the output plus one chunk's share, not twice the output
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 8))
    x, y = torch.randn(32, 32), torch.randint(0, 8, (32,))
    with LiveBytes() as tracker:
        grads = per_sample_grads(model, all_params(model), (x, y), chunk_size=4)
    result = sum(g.numel() * g.element_size() for g in grads.values())
    assert tracker.peak < 1.3 * result
    assert_grads_equal(grads, per_sample_grads(model, all_params(model), (x, y)))


# ---------------------------------------------------------------- annotations


@jaxtyped(typechecker=beartype)
def share_batch_dim(
    inputs: Shaped[torch.Tensor, "batch ..."], *grads: Float[torch.Tensor, "batch ..."]
):
    """Type-checks every gradient (beartype looks at one dict value only)."""


def test_jaxtyping_annotations_hold_at_runtime():
    checked = jaxtyped(typechecker=beartype)(per_sample_grads)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    params = all_params(model)
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    got = checked(model, params, (x, y))
    share_batch_dim(x, *got.values())
    assert {k: v.shape for k, v in got.items()} == {k: (B, *p.shape) for k, p in params.items()}
    with pytest.raises(TypeCheckError):  # params are Float tensors
        checked(model, {"0.weight": params["0.weight"].long()}, (x, y))
    with pytest.raises(TypeCheckError):  # inputs and targets share the batch dimension
        checked(model, params, (x, y[:3]))
    with pytest.raises(TypeCheckError):  # guards the helper: a gradient with another batch size
        share_batch_dim(x, got["0.bias"], got["0.weight"][:3])
