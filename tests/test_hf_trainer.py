"""The Hugging Face Trainer integration on a tiny random Llama, against independent references.

References: per-example gradients from a for-loop of ``torch.autograd.grad`` on the model's own
forward, projected with the spec's matrices; a dense ``(C + λI)`` built explicitly and solved in
float64.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import logix_func as lf  # noqa: E402
from logix_func.integrations.huggingface import (  # noqa: E402
    Attribution,
    AttributionArguments,
    AttributionTrainer,
    unwrap_model,
)

VOCAB, LENGTH = 24, 10
DENSE_LAYERS = ["lm_head", "model.layers.1.mlp.down_proj"]


def sequence(pattern: int, start: int, length: int = LENGTH) -> dict:
    """Tokens 1..VOCAB-1 counting by 1, counting by 2, or alternating; right-padded with 0."""
    step = [lambda t: t, lambda t: 2 * t, lambda t: 5 * (t % 2)][pattern]
    tokens = [1 + (start + step(t)) % (VOCAB - 1) for t in range(length)]
    pad = LENGTH - length
    return {
        "input_ids": tokens + [0] * pad,
        "attention_mask": [1] * length + [0] * pad,
        "labels": tokens + [-100] * pad,
        "source": pattern,  # not a forward argument: the trainer's column handling drops it
    }


TRAIN = [sequence(p, s, LENGTH - (s % 3 == 2) * 3) for p in range(3) for s in range(8)]
QUERIES = [sequence(0, 11), sequence(1, 13, 8), sequence(2, 17)]


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def training_args(out, steps: int = 8) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trainer")
    t = transformers.Trainer(model=tiny_llama(), args=training_args(out), train_dataset=TRAIN)
    t.train()  # training before attribution
    return t


def reference_grads(model, examples, names) -> dict[str, torch.Tensor]:
    """``{layer: [n, out, in]}`` weight gradients of each example's summed next-token loss."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    out = {n: [] for n in names}
    model.eval()
    for ex in examples:
        ids, mask = torch.tensor([ex["input_ids"]]), torch.tensor([ex["attention_mask"]])
        labels = torch.tensor(ex["labels"]).masked_fill(mask[0] == 0, -100)
        logits = model(input_ids=ids, attention_mask=mask).logits[0]
        loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        for n, g in zip(names, torch.autograd.grad(loss, weights), strict=True):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


def test_extract_log_rows_are_projected_gradients(trainer, tmp_path):
    options = AttributionArguments(store=str(tmp_path / "log"), rank=4, method="none")
    store = Attribution(trainer, options).extract_log()
    assert torch.equal(store.ids(), torch.arange(len(TRAIN)))
    model, spec = trainer.model, lf.logra(trainer.model, 4, seed=0)
    assert store.schema.spec == spec.to_dict()

    rows = store.read(torch.arange(len(TRAIN)))
    batch = {k: torch.tensor([ex[k] for ex in TRAIN]) for k in ("input_ids", "attention_mask")}
    batch["labels"] = torch.tensor([ex["labels"] for ex in TRAIN])
    batch["use_cache"] = True  # outputs carrying a DynamicCache (the Trainer turned it off)
    model.eval()
    direct = lf.projected_grads(model, dict(model.named_parameters()), batch, spec)
    assert set(rows) == set(direct) == set(spec.layers)
    for name in rows:
        torch.testing.assert_close(rows[name], direct[name], rtol=1e-4, atol=1e-6)

    full = reference_grads(model, TRAIN, DENSE_LAYERS)
    for name in DENSE_LAYERS:
        p_out, p_in = spec.matrices(name)
        torch.testing.assert_close(rows[name], p_out @ full[name] @ p_in.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["raw", "none"])
def test_influence_matches_a_dense_inverse(trainer, tmp_path, method):
    damping = 1e-2
    options = AttributionArguments(
        store=str(tmp_path / "log"),
        rank=None,
        layers=DENSE_LAYERS,
        method=method,
        fisher="empirical",
        damping=damping,
        progress=False,
    )
    attribution = Attribution(trainer, options)
    scores = attribution.influence(QUERIES)
    selfs = attribution.self_influence()
    assert scores.shape == (len(QUERIES), len(TRAIN)) and selfs.shape == (len(TRAIN),)

    def flat(grads):
        return torch.cat([grads[n].flatten(1) for n in DENSE_LAYERS], 1).double()

    g_train = flat(reference_grads(trainer.model, TRAIN, DENSE_LAYERS))
    g_query = flat(reference_grads(trainer.model, QUERIES, DENSE_LAYERS))
    if method == "raw":  # block diagonal: one covariance per layer, mean over examples
        blocks, start = [], 0
        for name in DENSE_LAYERS:
            size = dict(trainer.model.named_modules())[name].weight.numel()
            g = g_train[:, start : start + size]
            blocks.append(g.T @ g / len(TRAIN) + damping * torch.eye(size, dtype=torch.float64))
            start += size
        dense = torch.block_diag(*blocks)
    else:
        dense = torch.eye(g_train.shape[1], dtype=torch.float64)
    expected = g_query @ torch.linalg.solve(dense, g_train.T)
    expected_self = (g_train * torch.linalg.solve(dense, g_train.T).T).sum(1)
    scale = expected.abs().max()
    torch.testing.assert_close(scores.double() / scale, expected / scale, rtol=0, atol=2e-4)
    scale = expected_self.abs().max()
    torch.testing.assert_close(selfs.double() / scale, expected_self / scale, rtol=0, atol=2e-4)


def second_token_loss(outputs, labels):
    """A query measurement other than the training loss: the loss of token 1 given token 0."""
    return F.cross_entropy(outputs.logits[:, 0], labels[:, 1], reduction="sum")


def test_a_query_measurement_replaces_the_training_loss_for_queries_only(trainer, tmp_path):
    options = AttributionArguments(
        store=str(tmp_path / "log"),
        rank=None,
        layers=DENSE_LAYERS,
        method="none",
        measurement=second_token_loss,
        progress=False,
    )
    attribution = Attribution(trainer, options)
    scores = attribution.influence(QUERIES)
    best = attribution.top_k(QUERIES, k=3)

    model, weights = (
        trainer.model.eval(),
        [dict(trainer.model.named_modules())[n].weight for n in DENSE_LAYERS],
    )
    g_query = []  # hand-written measurement, one query at a time
    for ex in QUERIES:
        logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
        loss = F.cross_entropy(logits[0], torch.tensor(ex["labels"][1]), reduction="sum")
        g_query.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)]))
    g_query = torch.stack(g_query).double()
    train = reference_grads(model, TRAIN, DENSE_LAYERS)  # training rows keep the training loss
    g_train = torch.cat([train[n].flatten(1) for n in DENSE_LAYERS], 1).double()
    expected = g_query @ g_train.T
    scale = expected.abs().max()
    torch.testing.assert_close(scores.double() / scale, expected / scale, rtol=0, atol=2e-4)
    assert best.ids.tolist() == expected.topk(3, dim=1).indices.tolist()
    plain = Attribution(trainer, AttributionArguments(**{**options.__dict__, "measurement": None}))
    assert (plain.influence(QUERIES) - scores).abs().max() > 0.1 * scale  # not the same scores


def test_a_duplicated_training_sequence_ranks_itself_first(trainer, tmp_path):
    options = AttributionArguments(store=str(tmp_path / "log"), rank=8, progress=False)
    attribution = Attribution(trainer, options)  # EKFAC, true Fisher, dot products
    picks = [0, 5, 10, 13, 21]
    best = attribution.top_k([TRAIN[i] for i in picks], k=1)
    assert best.ids[:, 0].tolist() == picks
    selfs = attribution.self_influence()
    assert selfs.shape == (len(TRAIN),) and bool((selfs > 0).all())
    scores = attribution.influence([TRAIN[i] for i in picks])
    torch.testing.assert_close(scores[range(len(picks)), picks], selfs[picks], rtol=1e-4, atol=0)


def test_custom_ids_name_the_score_columns(trainer, tmp_path):
    def reversed_ids(batch, offset):  # the log's order is not the ids' order
        return len(TRAIN) - 1 - lf.pipeline.position_ids(batch, offset)

    by_index = Attribution(trainer, AttributionArguments(store=str(tmp_path / "a"), rank=4))
    custom = AttributionArguments(store=str(tmp_path / "b"), rank=4, ids=reversed_ids)
    by_custom = Attribution(trainer, custom)
    scores = by_custom.influence(QUERIES)
    ids = by_custom.train_ids()
    assert sorted(ids.tolist()) == list(range(len(TRAIN)))
    expected = by_index.influence(QUERIES)[:, len(TRAIN) - 1 - ids]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    best = by_custom.top_k(QUERIES, k=2)
    torch.testing.assert_close(best.values, scores.topk(2, dim=1).values)
    assert torch.equal(best.ids, ids[scores.topk(2, dim=1).indices])


class Interrupted(torch.utils.data.Dataset):
    """The training list, failing from index ``fail_at`` on while ``fail_at`` is set."""

    def __init__(self, items, fail_at):
        self.items, self.fail_at, self.read = items, fail_at, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise RuntimeError("interrupted")
        self.read.append(i)
        return self.items[i]


def test_an_interrupted_extract_log_resumes_without_duplicates(trainer, tmp_path):
    data = Interrupted(TRAIN, fail_at=10)
    t = transformers.Trainer(model=trainer.model, args=training_args(tmp_path), train_dataset=data)
    options = AttributionArguments(store=str(tmp_path / "log"), rank=4, batch_size=4)
    attribution = Attribution(t, options)
    with pytest.raises(RuntimeError, match="interrupted"):
        attribution.extract_log()
    assert lf.LogStore.open(str(tmp_path / "log")).committed_ids() == set(range(8))

    data.fail_at, data.read = None, []
    store = attribution.extract_log()
    assert data.read == list(range(8, len(TRAIN)))  # only what was missing
    assert torch.equal(store.ids().sort().values, torch.arange(len(TRAIN)))  # no duplicates
    data.read = []
    assert len(attribution.extract_log()) == len(TRAIN) and data.read == []  # complete: no pass
    fresh = Attribution(t, AttributionArguments(store=str(tmp_path / "fresh"), rank=4))
    expected = fresh.extract_log().read(torch.arange(len(TRAIN)))
    for name, rows in store.read(torch.arange(len(TRAIN))).items():
        torch.testing.assert_close(rows, expected[name], rtol=1e-5, atol=1e-7)


def test_the_trainer_is_left_as_it_was(tmp_path):
    t = AttributionTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, steps=4),
        train_dataset=TRAIN,
        attribution_args=AttributionArguments(rank=4, progress=False),
    )
    t.train()
    model_state = copy.deepcopy(t.model.state_dict())
    optimizer, scheduler = t.optimizer, t.lr_scheduler
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scheduler_state = copy.deepcopy(scheduler.state_dict())
    callbacks = list(t.callback_handler.callbacks)
    history = copy.deepcopy(t.state.log_history)
    t.model.train()
    modes = {n: m.training for n, m in t.model.named_modules()}

    scores = t.influence(QUERIES)
    assert scores.shape == (len(QUERIES), len(TRAIN)) and bool(scores.isfinite().all())
    assert t.self_influence().shape == (len(TRAIN),)
    assert t.top_k(QUERIES, k=3).ids.shape == (len(QUERIES), 3)
    weights = lf.weights_fingerprint(t.model)
    assert t.attribution.store_url == f"{tmp_path}/attribution/weights-{weights}"

    for name, value in t.model.state_dict().items():
        assert torch.equal(value, model_state[name]), name
    assert t.optimizer is optimizer and t.lr_scheduler is scheduler
    torch.testing.assert_close(optimizer.state_dict(), optimizer_state, rtol=0, atol=0)
    assert scheduler.state_dict() == scheduler_state
    assert t.callback_handler.callbacks == callbacks and t.state.log_history == history
    assert {n: m.training for n, m in t.model.named_modules()} == modes
    assert all(p.grad is None or not p.grad.abs().sum() for p in t.model.parameters())

    t.train()  # training still works afterwards
    changed = any(not torch.equal(v, model_state[k]) for k, v in t.model.state_dict().items())
    assert changed and all(torch.isfinite(p).all() for p in t.model.parameters())


def test_default_store_is_keyed_by_the_weights_not_the_step(trainer, tmp_path):
    """A fresh Trainer (step 0) on other weights gets its own store; a store of other weights
    given explicitly is refused, and the trained trainer's rows stay as they were."""
    options = AttributionArguments(rank=4, method="none", progress=False)
    fresh = [transformers.Trainer(model=tiny_llama(), args=training_args(tmp_path / "o"))]
    other = tiny_llama()
    with torch.no_grad():
        other.lm_head.weight += 0.1
    fresh.append(
        transformers.Trainer(model=other, args=training_args(tmp_path / "o"), train_dataset=TRAIN)
    )
    urls = [Attribution(t, options).store_url for t in fresh]
    assert all(t.state.global_step == 0 for t in fresh) and urls[0] != urls[1]
    assert urls[0] == f"{tmp_path}/o/attribution/weights-{lf.weights_fingerprint(tiny_llama())}"

    url = str(tmp_path / "trained")
    Attribution(trainer, AttributionArguments(**{**vars(options), "store": url})).extract_log()
    mixed = AttributionArguments(**{**vars(options), "store": url})
    with pytest.raises(ValueError, match="weights.*new store"):
        Attribution(fresh[1], mixed).extract_log()
    assert lf.LogStore.open(url).schema.weights == lf.weights_fingerprint(trainer.model)


def test_unwrap_model_sees_through_wrappers():
    model = tiny_llama()
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(torch.compile(model)) is model


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="method"):
        AttributionArguments(method="lissa")
    with pytest.raises(ValueError, match="ids"):
        AttributionArguments(ids="content")


def tensors(tree) -> list[torch.Tensor]:
    """Every tensor of nested dicts, lists and tuples, in order."""
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def test_curvature_is_found_again_by_a_later_attribution(trainer, tmp_path):
    """Factors are kept under the cache folder: a new Attribution (as in a new process) on the
    same weights loads them unchanged; other weights fit and keep their own."""
    options = AttributionArguments(
        store=str(tmp_path / "log"),
        rank=4,
        method="kfac",
        cache=str(tmp_path / "c"),
        progress=False,
    )
    first = Attribution(trainer, options).fit_curvature()
    (entry,) = (tmp_path / "c").iterdir()
    stamp = entry.stat().st_mtime_ns
    again = Attribution(trainer, options).fit_curvature()
    assert [p.name for p in (tmp_path / "c").iterdir()] == [entry.name]
    assert entry.stat().st_mtime_ns == stamp  # loaded, not fitted and written again
    assert len(tensors(first)) > 0
    assert all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(again), strict=True))

    other = tiny_llama()  # untrained weights, same data and options
    fresh = transformers.Trainer(model=other, args=training_args(tmp_path), train_dataset=TRAIN)
    Attribution(fresh, options).fit_curvature()
    assert len(list((tmp_path / "c").iterdir())) == 2
    refit = Attribution(trainer, AttributionArguments(**{**vars(options), "cache": False}))
    assert refit._cache is None and len(list((tmp_path / "c").iterdir())) == 2


def test_the_dense_ggn_methods_reach_the_trainer(trainer, tmp_path):
    """method="ggn" gives each layer a dense [k, k] block (symmetric, positive semidefinite);
    "auto" (the default), with the labels of a language model sampled, is EKFAC."""

    def fit(method):
        options = AttributionArguments(
            store=str(tmp_path / method), rank=2, method=method, cache=False, progress=False
        )
        attribution = Attribution(trainer, options)
        return attribution, attribution.fit_curvature()

    attribution, factors = fit("ggn")
    blocks = {n: f["C"] for n, f in factors["layers"].items()}
    assert set(blocks) == set(attribution.spec.layers)
    for block in blocks.values():
        assert block.shape == (4, 4) and torch.allclose(block, block.T)
        assert torch.linalg.eigvalsh(block.double()).min() > -1e-6 * block.abs().max()
    assert torch.isfinite(attribution.influence(QUERIES)).all()
    assert AttributionArguments(store="unused").method == "auto"
    auto, ekfac = fit("auto")[1], fit("ekfac")[1]
    for name, f in ekfac["layers"].items():
        assert "QA" in f and auto["layers"][name].keys() == f.keys()
        assert all(torch.equal(auto["layers"][name][k], v) for k, v in f.items())
