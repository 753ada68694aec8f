"""A PyTorch Lightning callback that logs projected gradients (and captures) to a LogStore.

``LogStoreCallback`` runs its own functional pass on the batches Lightning hands to
``on_predict_batch_end`` / ``on_validation_batch_end`` (or to ``on_train_batch_end``: every
batch of every ``every_n_train_steps``-th optimizer step, all the accumulated batches of the
step, on the weights after it), on the module's current weights, detached: the
training step's loss, gradients, optimizer, loggers and checkpoints never see it. Needs the
``lightning`` extra (``pip install -e ".[lightning]"`` in a clone).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from .._batch import ModelBatch
from .._capture import capture, flatten_capture
from .._compat import tree_map
from .._ids import content_ids
from .._origin import weights_fingerprint
from .._projected_grads import projected_grads
from .._projection import ProjectionSpec
from .._stats import RunningStat
from ..pipeline import store_schema
from ..store import LogStore

STAGES = ("predict", "validate", "train")


def batch_content_ids(batch: Any) -> Tensor:
    """Default data ids: a content hash of each sample (inputs and targets)."""
    mb = ModelBatch.from_batch(batch)
    return content_ids(mb.tensors["args"], mb.tensors["kwargs"], mb.tensors["targets"])


class LogStoreCallback(pl.Callback):
    """Append projected per-sample gradients (and captures) of Lightning batches to a LogStore.

    Args:
        store: an open :class:`~logix_func.store.LogStore`, or a URL created on the first batch
            (:func:`~logix_func.pipeline.store_schema` of the spec and captures; ``writer`` =
            the trainer's global rank). A URL with ``{step}`` gets one store per logged
            training step (``"logs/step{step}"``: gradients at several checkpoints), one with
            ``{weights}`` one store per set of weights (their fingerprint); such a store
            records its weights fingerprint. A URL with neither gathers rows of the weights of
            several steps and records none.
        spec: the :class:`~logix_func._projection.ProjectionSpec` of ``model``'s layers.
        stages: when to log: any of ``"predict"``, ``"validate"``, ``"train"``.
        every_n_train_steps: with ``"train"``, log every batch of every N-th optimizer step
            (all of them under gradient accumulation), on the weights after that step.
        model: ``model(pl_module)`` → the ``nn.Module`` the spec was built for (default: the
            LightningModule itself); only called functionally.
        batch_fn: ``batch_fn(batch)`` → an ``(inputs, targets)`` or ``labels`` dict batch
            (default: the batch as it is).
        ids: ``ids(batch)`` → data ids of Lightning's batch, before ``batch_fn`` (e.g. the
            indices of an :class:`~logix_func._ids.IndexedDataset`); default: a content hash of
            the converted batch (:func:`batch_content_ids`). The store rejects ids it holds.
        capture_options: if given, keyword arguments of :func:`~logix_func._capture.capture`
            (``layers``, ``what``, ``reduce``, ``watch``; ``project`` defaults to ``spec``):
            its entries are stored beside the gradients as ``"layer.kind"``.
        statistic: a :class:`~logix_func._stats.RunningStat` accumulated over every stored row
            (masked tokens excluded); read ``callback.state`` or ``callback.statistics()``.
        stat_device: where the statistic's state lives (``"cpu"`` by default).
        loss_fn: the per-sample loss, as in :func:`~logix_func.projected_grads`.
        dtype: the dtype of the stored rows.
    """

    def __init__(
        self,
        store: LogStore | str,
        spec: ProjectionSpec,
        *,
        stages: Collection[str] = ("predict", "validate"),
        every_n_train_steps: int | None = None,
        model: Callable[[pl.LightningModule], nn.Module] | None = None,
        batch_fn: Callable[[Any], Any] | None = None,
        ids: Callable[[Any], Tensor | list] | None = None,
        capture_options: Mapping[str, Any] | None = None,
        statistic: RunningStat | None = None,
        stat_device: torch.device | str = "cpu",
        loss_fn: Any = None,
        dtype: torch.dtype = torch.float32,
    ):
        unknown = sorted(set(stages) - set(STAGES))
        if unknown or not stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages!r}")
        if "train" in stages and (
            isinstance(every_n_train_steps, bool)
            or not isinstance(every_n_train_steps, int)
            or every_n_train_steps < 1
        ):
            raise ValueError("stages with 'train' need every_n_train_steps, a positive int")
        if not isinstance(spec, ProjectionSpec):
            raise TypeError(f"spec must be a ProjectionSpec, got {type(spec).__name__}")
        self.store, self.spec, self.stages = store, spec, tuple(stages)
        self.every = every_n_train_steps
        self.model_of = model or (lambda module: module)
        self.batch_fn = batch_fn or (lambda batch: batch)
        self.ids = ids
        self.capture_options = None if capture_options is None else dict(capture_options)
        self.statistic, self.stat_device = statistic, stat_device
        self.loss_fn, self.dtype = loss_fn, dtype
        self.state: dict | None = None
        self.stores: dict[str, LogStore] = {}
        self._step = 0  # global_step when the current training batch started
        self._pending: list[tuple[Any, Any]] = []  # (ids, batch) of the step in progress

    # ------------------------------------------------------------------ Lightning hooks

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if "predict" in self.stages:
            self.log_batch(trainer, pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if "validate" in self.stages and not trainer.sanity_checking:
            self.log_batch(trainer, pl_module, batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Keep the batches of a step to log; log them once the step has updated the weights."""
        if "train" not in self.stages or (self._step + 1) % self.every:
            return
        self._pending.append((None if self.ids is None else self.ids(batch), batch))
        if trainer.global_step != self._step:  # the optimizer stepped after this batch
            pending, self._pending = self._pending, []
            for ids, kept in pending:
                self.log_batch(trainer, pl_module, kept, ids)

    def on_predict_end(self, trainer, pl_module):
        self.flush()

    def on_validation_end(self, trainer, pl_module):
        self.flush()

    def on_train_end(self, trainer, pl_module):
        self.flush()

    # ------------------------------------------------------------------ logging

    def log_batch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        data_ids: Tensor | list | None = None,
    ) -> None:
        """Compute and append the rows of one batch (a separate, detached functional pass);
        ``data_ids`` default to ``ids(batch)``."""
        model = self.model_of(pl_module)
        if data_ids is None and self.ids is not None:
            data_ids = self.ids(batch)
        # Lightning evaluates under inference_mode: leave it and copy inference tensors
        with torch.inference_mode(False), torch.enable_grad():
            batch = tree_map(_usable, self.batch_fn(batch))
            params = {n: p.detach() for n, p in model.named_parameters()}
            rows = projected_grads(model, params, batch, self.spec, loss_fn=self.loss_fn)
            masks, captured = {}, None
            if self.capture_options is not None:
                options = {"project": self.spec, "loss_fn": self.loss_fn, **self.capture_options}
                captured = capture(model, params, batch, **options)
                for name, kinds in captured.items():
                    for kind in kinds:
                        if "mask" in kinds and kind != "mask":
                            masks[f"{name}.{kind}"] = kinds["mask"]
                rows = {**rows, **flatten_capture(captured)}
            rows = {k: v.detach().to(self.dtype) for k, v in rows.items()}
        store = self._store(trainer, model, captured)
        store.append(batch_content_ids(batch) if data_ids is None else data_ids, rows)
        if self.statistic is not None:
            values = {k: v for k, v in rows.items() if not k.endswith(".mask")}
            if self.state is None:
                self.state = self.statistic.init(values, device=self.stat_device)
            mask = {k: masks.get(k) for k in values} if masks else None
            self.state = self.statistic.update(self.state, values, mask)

    def statistics(self) -> dict[str, Tensor]:
        """``statistic.finalize`` of the rows logged so far: ``{entry: Tensor}``."""
        if self.state is None:
            raise ValueError("no statistic was accumulated (statistic=None, or nothing logged)")
        return self.statistic.finalize(self.state)

    def flush(self) -> None:
        """Wait until every appended row is written and committed."""
        for store in self.stores.values() if isinstance(self.store, str) else [self.store]:
            store.flush()

    def _store(self, trainer: pl.Trainer, model: nn.Module, captured: dict | None) -> LogStore:
        if not isinstance(self.store, str):
            return self.store
        keys = {}
        if "{step}" in self.store:
            keys["step"] = trainer.global_step
        if "{weights}" in self.store:
            keys["weights"] = weights_fingerprint(model)
        url = self.store.format(**keys) if keys else self.store
        if url not in self.stores:
            schema = store_schema(
                model, self.spec, self.dtype, captures=captured, loss_fn=self.loss_fn
            )
            if not keys:  # rows of the weights of several steps: no one fingerprint is true
                schema = replace(schema, weights=None)
            writer = trainer.global_rank
            self.stores[url] = LogStore.create(url, schema, writer=writer, exist_ok=True)
        return self.stores[url]


def _usable(value: Any) -> Any:
    """An inference-mode tensor (made under ``torch.inference_mode``) as a normal copy."""
    return value.clone() if isinstance(value, Tensor) and value.is_inference() else value
