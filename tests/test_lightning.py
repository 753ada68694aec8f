"""LogStoreCallback: rows equal projected_grads on the weights of the step; training unaffected."""

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from logix_func.integrations.lightning import LogStoreCallback, batch_content_ids  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def loader():
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    return DataLoader(data, batch_size=5)


def trainer(tmp_path, callbacks, logger=False, **options):
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        **options,
    )


def stored(url, ids):
    return lf.LogStore.open(url).read(ids)


def test_predict_logs_projected_grads_captures_and_statistics(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    spec = lf.logra(module, rank=2, seed=4)
    url = str(tmp_path / "predict")
    callback = LogStoreCallback(
        url,
        spec,
        stages=["predict"],
        capture_options={"layers": ["net.0"], "what": ["inputs", "output_grads"]},
        statistic=lf.running_mean(),
    )
    trainer(tmp_path, [callback]).predict(module, dataloaders=loader())
    batches = list(loader())
    ids = torch.cat([batch_content_ids(b) for b in batches])
    rows = stored(url, ids)
    assert lf.LogStore.open(url).schema.weights is None  # a URL without {step} or {weights}
    params = {n: p.detach() for n, p in module.named_parameters()}
    for name in ("net.0", "net.2"):
        expected = torch.cat([lf.projected_grads(module, params, b, spec)[name] for b in batches])
        torch.testing.assert_close(rows[name], expected.float())
    captured = [lf.capture(module, params, b, layers=["net.0"], project=spec) for b in batches]
    for kind in ("inputs", "output_grads"):
        want = torch.cat([c["net.0"][kind] for c in captured]).float()
        torch.testing.assert_close(rows[f"net.0.{kind}"], want)
    means = callback.statistics()
    for key in ("net.2", "net.0.inputs"):
        np.testing.assert_allclose(
            means[key].numpy(), rows[key].double().mean(0).numpy(), rtol=1e-6
        )
    with pytest.raises(lf.DuplicateIdError):  # the same batches again: ids already stored
        trainer(tmp_path, [callback]).predict(module, dataloaders=loader())


def test_validate_logs_every_batch_once(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    spec = lf.logra(module, rank=(3, 2))
    store = lf.LogStore.create(str(tmp_path / "val"), lf.store_schema(module, spec))
    trainer(tmp_path, [LogStoreCallback(store, spec, stages=["validate"])]).validate(
        module, dataloaders=loader()
    )
    batches = list(loader())
    params = {n: p.detach() for n, p in module.named_parameters()}
    rows = stored(str(tmp_path / "val"), torch.cat([batch_content_ids(b) for b in batches]))
    for name in spec.layers:
        want = torch.cat([lf.projected_grads(module, params, b, spec)[name] for b in batches])
        torch.testing.assert_close(rows[name], want.float())
    assert len(lf.LogStore.open(str(tmp_path / "val")).committed_ids()) == 20


class IndexedClassifier(Classifier):
    def predict_step(self, batch, batch_idx):
        return self(batch[1][0])


def test_dataset_indices_as_ids(tmp_path):
    torch.manual_seed(0)
    module = IndexedClassifier()
    spec = lf.logra(module, rank=2)
    url = str(tmp_path / "indexed")
    callback = LogStoreCallback(
        url, spec, stages=["predict"], ids=lambda b: b[0], batch_fn=lambda b: b[1]
    )
    data = DataLoader(lf.IndexedDataset(loader().dataset), batch_size=5, shuffle=True)
    trainer(tmp_path, [callback]).predict(module, dataloaders=data, return_predictions=False)
    x, y = loader().dataset.tensors
    params = {n: p.detach() for n, p in module.named_parameters()}
    want = lf.projected_grads(module, params, (x, y), spec)
    rows = stored(url, torch.arange(20))
    for name in spec.layers:
        torch.testing.assert_close(rows[name], want[name].float())


class Snapshots(pl.Callback):
    """Copies of the weights after every optimizer step (test reference)."""

    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = (
            copy.deepcopy({n: p.detach() for n, p in pl_module.named_parameters()}),
            [t.clone() for t in batch],
        )


def fit(tmp_path, callbacks, name):
    torch.manual_seed(0)
    module = Classifier()
    logger = CSVLogger(tmp_path, name=name, version=0)
    t = trainer(tmp_path, callbacks, logger=logger)
    t.limit_val_batches = 2
    t.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    return module, t, (tmp_path / name / "version_0" / "metrics.csv").read_text()


def test_training_steps_logged_on_the_weights_of_the_step_and_training_unaffected(tmp_path):
    plain_module, plain_trainer, plain_metrics = fit(tmp_path, [], "plain")
    spec = lf.logra(plain_module, rank=2)
    snapshots = Snapshots()
    url = str(tmp_path / "step{step}")
    callback = LogStoreCallback(url, spec, stages=["train"], every_n_train_steps=2)
    module, t, metrics = fit(tmp_path, [snapshots, callback], "logged")
    # training is the same as without the callback: weights, optimizer state, logged metrics
    for (n, p), q in zip(module.named_parameters(), plain_module.parameters(), strict=True):
        assert torch.equal(p, q), n
    state, plain_state = t.optimizers[0].state_dict(), plain_trainer.optimizers[0].state_dict()
    for k, v in state["state"].items():
        for key in v:
            assert torch.equal(v[key], plain_state["state"][k][key])
    assert metrics == plain_metrics and "train_loss" in metrics
    for p, q in zip(module.parameters(), plain_module.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    # steps 2 and 4 were logged, each on the weights right after that step
    assert sorted(callback.stores) == [str(tmp_path / "step2"), str(tmp_path / "step4")]
    for step in (2, 4):
        weights, batch = snapshots.weights[step]
        rows = stored(str(tmp_path / f"step{step}"), batch_content_ids(batch))
        recorded = lf.LogStore.open(str(tmp_path / f"step{step}")).schema.weights
        assert recorded == lf.weights_fingerprint(module, weights)  # one store per step's weights
        want = lf.projected_grads(module, weights, batch, spec)
        for name in spec.layers:
            torch.testing.assert_close(rows[name], want[name].float())


def test_every_accumulated_batch_of_a_logged_step_is_logged(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    spec = lf.logra(module, rank=3, seed=2)
    snapshots = Snapshots()
    callback = LogStoreCallback(
        str(tmp_path / "step{step}"), spec, stages=["train"], every_n_train_steps=1
    )
    t = trainer(tmp_path, [snapshots, callback], accumulate_grad_batches=2)  # 4 batches, 2 steps
    t.fit(module, train_dataloaders=loader())
    assert t.global_step == 2
    batches = list(loader())
    for step in (1, 2):
        weights, _ = snapshots.weights[step]
        store = lf.LogStore.open(str(tmp_path / f"step{step}"))
        mine = batches[2 * step - 2 : 2 * step]  # the two batches accumulated into this step
        ids = torch.cat([batch_content_ids(b) for b in mine])
        assert sorted(store.ids().tolist()) == sorted(ids.tolist())  # 10 rows, none missing
        rows = store.read(ids)
        for name in spec.layers:  # a loop of projected_grads on the weights after the step
            want = torch.cat([lf.projected_grads(module, weights, b, spec)[name] for b in mine])
            torch.testing.assert_close(rows[name], want.float())


def test_bad_options_are_named():
    spec = lf.logra(Classifier(), rank=2)
    with pytest.raises(ValueError, match="every_n_train_steps"):
        LogStoreCallback("x", spec, stages=["train"])
    with pytest.raises(ValueError, match="stages"):
        LogStoreCallback("x", spec, stages=["test"])
