"""Attribution for a Hugging Face ``Trainer``: log, fit curvature, score — nothing else touched.

:class:`Attribution` wraps an existing ``Trainer``; :class:`AttributionTrainer` is a ``Trainer``
with the same methods. Both only *read* the trainer: its model (unwrapped from DDP /
accelerate / ``torch.compile``), arguments, data collator and training set. The optimizer,
scheduler, callbacks, logs and weights stay as they are, so ``trainer.train()`` can run before
and after. The model runs in eval mode while attributing (no dropout); each module's mode is
restored afterwards.

Data ids are dataset indices (``ids="index"``): examples are read in dataset order, never
shuffled, so an interrupted :meth:`Attribution.extract_log` resumes where it stopped.

Under ``torchrun`` (``TrainingArguments.world_size > 1``) every rank calls the same methods:
the ranks log their share of the batches into one store, sum the curvature, score their block
of the training rows and gather, so every rank returns the single-process result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from transformers import Trainer

from .._compat import collator_with_removed_columns, remove_unused_columns
from .._influence import Mode, TopK
from .._influence import influence as influence_scores
from .._influence import self_influence as self_scores
from .._origin import provenance, weights_fingerprint
from .._projection import ProjectionSpec, logra
from ..curvature import preconditioner as make_preconditioner
from ..curvature._kfac import Fisher
from ..distributed import Group, gather_scores, gather_top_k, store_part
from ..pipeline import (
    fit_curvature,
    log_dataset,
    open_store,
    position_ids,
    query_grads,
    store_schema,
)
from ..store import LogStore
from ..typing import Rows

Method = Literal["kfac", "ekfac", "raw", "ggn", "joint_ggn", "dual_ggn", "auto", "none"]


@dataclass(frozen=True)
class AttributionArguments:
    """Options of :class:`Attribution`.

    Args:
        store: URL of the training log (local path or tensorstore kvstore URL); ``None`` =
            ``<output_dir>/attribution/weights-<fingerprint>``, one log per set of weights
            (:func:`~logix_func.weights_fingerprint`). A store holds rows of one set of
            weights: logging other weights into it is refused.
        rank: LoGra rank ``k`` per side, ``(k_out, k_in)``, or ``None`` for full gradients.
        seed: seed of the projection matrices (and of the sampled labels of the true Fisher).
        layers: module names or glob patterns to cover (``"model.layers.*.mlp.*"``,
            ``"*.weight"``); ``None`` = every projectable layer.
        exclude: names or patterns of layers to leave out (e.g. ``["*embed*"]``).
        method: curvature: ``"auto"`` (default: where the Fisher is the exact expectation
            over few classes, the GGN per layer where every block is small, else of all
            layers in its dual form where samples × classes are few, else EKFAC — language
            models get EKFAC), ``"ekfac"``, ``"kfac"``, ``"raw"`` (full covariance of each
            layer's projected gradient), ``"ggn"`` (the exact per-layer GGN in the projected
            space), ``"joint_ggn"`` (the GGN of all layers together, cross-layer blocks
            included), ``"dual_ggn"`` (the same, kept as its samples' rows) or
            ``"none"`` (plain gradient dot products); see
            :func:`~logix_func.fit_curvature`.
        fisher: ``"auto"`` (exact where cheap, else sampled), ``"true"`` (sampled labels),
            ``"empirical"`` (the data's) or ``"exact"``.
        damping: ``None`` = 0.1 × the mean eigenvalue per layer; a float is absolute.
        dtype: dtype of the stored rows.
        ids: ``"index"`` (dataset positions) or ``ids(batch, offset) -> Tensor [B]`` of the
            collated batch.
        batch_size: examples per pass; ``None`` = the trainer's eval batch size.
        progress: progress bars; ``None`` follows ``TrainingArguments.disable_tqdm``, on the
            first process of each machine only.
        loss_fn: ``loss_fn(outputs, labels)`` → loss of one example; ``None`` = the model's
            token cross-entropy summed over tokens (causal shift for ``*ForCausalLM``).
        measurement: what is attributed for a query, with ``loss_fn``'s signature: loss-like
            (lower is better), e.g. the loss of a completion only or ``-margin``; ``None`` =
            ``loss_fn``. Only query rows use it; training rows and curvature use ``loss_fn``.
        cache: where fitted curvature factors are kept and found again by a later process
            (``fit_curvature(cache=...)``: reused only for the same weights, spec, loss,
            method, Fisher, seed and data); ``None`` = ``<output_dir>/attribution/curvature``,
            ``False`` = refit every time.
    """

    store: str | None = None
    rank: int | tuple[int, int] | None = 64
    seed: int = 0
    layers: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    method: Method = "auto"
    fisher: Fisher = "auto"
    damping: float | None = None
    dtype: torch.dtype = torch.float32
    ids: Literal["index"] | Callable[[Any, int], Tensor] = "index"
    batch_size: int | None = None
    progress: bool | None = None
    loss_fn: Callable[[Any, Tensor], Tensor] | None = None
    measurement: Callable[[Any, Tensor], Tensor] | None = None
    cache: str | dict | Literal[False] | None = None

    def __post_init__(self):
        if self.method not in (
            "kfac",
            "ekfac",
            "raw",
            "ggn",
            "joint_ggn",
            "dual_ggn",
            "auto",
            "none",
        ):
            raise ValueError(
                "method must be 'kfac', 'ekfac', 'raw', 'ggn', 'joint_ggn', 'dual_ggn', 'auto' "
                f"or 'none', got {self.method!r}"
            )
        if self.ids != "index" and not callable(self.ids):
            raise ValueError(f"ids must be 'index' or a callable (batch, offset), got {self.ids!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DeepSpeed / accelerate / ``torch.compile`` wrappers."""
    while True:
        model = extract_model_from_parallel(model)
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then every module back in its own mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


class Attribution:
    """Influence of a ``Trainer``'s training examples, using the trainer's model and collator.

    ``Attribution(trainer, AttributionArguments(...))``; the trainer is only read. Scores
    follow the library's conventions: ``k(q, i) = g_qᵀ (H + λI)⁻¹ g_i`` with per-example
    losses summed over tokens, positive when example ``i`` helps query ``q``, not divided by N.
    """

    def __init__(self, trainer: Trainer, args: AttributionArguments | None = None):
        self.trainer = trainer
        self.args = args or AttributionArguments()
        self._factors: tuple[str, Any, dict[str, Any]] | None = None  # weights, data, factors

    # the pieces

    @property
    def model(self) -> nn.Module:
        """The trainer's model, unwrapped."""
        wrapped = self.trainer.model_wrapped
        return unwrap_model(self.trainer.model if wrapped is None else wrapped)

    @property
    def spec(self) -> ProjectionSpec:
        """The LoGra projection (derived from the options; nothing random is stored)."""
        a = self.args
        layers, exclude = (None if x is None else list(x) for x in (a.layers, a.exclude))
        return logra(self.model, a.rank, seed=a.seed, layers=layers, exclude=exclude)

    @property
    def store_url(self) -> str:
        """Where the training log lives."""
        if self.args.store is not None:
            return self.args.store
        weights = weights_fingerprint(self.model)
        return f"{self.trainer.args.output_dir}/attribution/weights-{weights}"

    @property
    def _cache(self) -> str | dict | None:
        """Where :meth:`fit_curvature` keeps its factors (``None``: nowhere)."""
        if self.args.cache is False:
            return None
        if self.args.cache is not None:
            return self.args.cache
        return f"{self.trainer.args.output_dir}/attribution/curvature"

    @property
    def group(self) -> Group:
        """``torch.distributed.group.WORLD`` when the trainer runs on several processes, else
        ``None`` (this process alone)."""
        world = self.trainer.args.world_size
        if world == 1:
            return None
        if not dist.is_initialized():
            raise RuntimeError(
                f"the Trainer has world_size={world} but torch.distributed is not initialized"
            )
        return dist.group.WORLD

    def loader(self, dataset: Any) -> Batches:
        """``dataset`` batched in order with the trainer's collator (unused columns dropped).

        Not sharded: with several processes every rank gets the same batches and the pipeline
        picks its own (batch ``i`` on rank ``i % world``)."""
        return Batches(self.trainer, dataset, self.args.batch_size, self.model)

    # the pipeline

    def extract_log(self) -> LogStore:
        """Log the projected gradient of every training example to :attr:`store_url`.

        Rows already committed there are skipped, so a rerun after an interruption resumes
        (rows of finished batches are committed even when the run stops with an error); with
        index ids the examples already logged are not even read. Returns the store, open for
        reading.
        """
        dataset = self._train(None)
        model, spec, group = self.model, self.spec, self.group
        url = self._shared_url()
        schema = store_schema(model, spec, self.args.dtype, loss_fn=self.args.loss_fn)
        rank = 0 if group is None else dist.get_rank(group)
        with eval_mode(model), open_store(url, schema, rank) as store:  # close = commit
            ids = self.args.ids
            if ids == "index":
                todo = torch.tensor(sorted(set(range(len(dataset))) - store.committed_ids()))
                if group is not None:  # every rank has read the same ids before any writes
                    dist.barrier(group=group)
                if len(todo) == 0:
                    return LogStore.open(url)
                dataset = Subset(dataset, todo.tolist())
                ids = lambda batch, offset: todo[position_ids(batch, offset)]  # noqa: E731
            log_dataset(
                model,
                dict(model.named_parameters()),
                self.loader(dataset),
                spec,
                store,
                loss_fn=self.args.loss_fn,
                ids=ids,
                dtype=self.args.dtype,
                progress=self._progress,
                group=group,
            )
        return LogStore.open(url)

    def fit_curvature(self, dataset: Any = None) -> dict[str, Any] | None:
        """Curvature factors over ``dataset`` (default: the training set), kept until the
        weights change (their fingerprint); ``None`` for ``method="none"``."""
        if self.args.method == "none":
            return None
        dataset, step = self._train(dataset), weights_fingerprint(self.model)
        cached = self._factors
        if cached is None or cached[0] != step or cached[1] is not dataset:
            model = self.model
            with eval_mode(model):
                factors = fit_curvature(
                    model,
                    dict(model.named_parameters()),
                    self.loader(dataset),
                    self.spec,
                    method=self.args.method,
                    fisher=self.args.fisher,
                    seed=self.args.seed,
                    loss_fn=self.args.loss_fn,
                    progress=self._progress,
                    group=self.group,
                    cache=self._cache,
                )
            self._factors = (step, dataset, factors)
        return self._factors[2]

    def preconditioner(self) -> Callable[[Rows], Rows]:
        """``grads -> (H + λI)⁻¹ grads`` from :meth:`fit_curvature` (identity for "none")."""
        return make_preconditioner(self.fit_curvature(), self.args.damping)

    def grads(self, dataset: Any) -> Rows:
        """Projected gradients ``{layer: [n, k_out, k_in]}`` of ``dataset``'s examples' losses
        (``loss_fn``, as the training rows)."""
        return self._grads(dataset, self.args.loss_fn)

    def query_grads(self, queries: Any) -> Rows:
        """Projected gradients ``{layer: [Q, k_out, k_in]}`` of the queries' ``measurement``
        (``loss_fn`` when it is ``None``): the query rows of :meth:`influence` and
        :meth:`top_k`."""
        measurement = self.args.measurement
        return self._grads(queries, self.args.loss_fn if measurement is None else measurement)

    def _grads(self, dataset: Any, measurement: Any) -> Rows:
        model = self.model
        with eval_mode(model):
            params = dict(model.named_parameters())
            loader = self.loader(dataset)
            return query_grads(model, params, loader, self.spec, measurement=measurement)

    # the answers

    def influence(self, queries: Any, *, mode: Mode = "dot") -> Float[Tensor, "queries train"]:
        """Scores ``[Q, N]`` of every training example for every query example.

        Logs the training set first if needed (resuming). Column ``j`` is the training example
        with data id :meth:`train_ids` ``[j]``: dataset index ``j`` with ``ids="index"``.
        With several processes each rank scores its block of rows and every rank returns the
        whole matrix.
        """
        store, group = self.extract_log(), self.group
        scores = influence_scores(
            self.query_grads(queries),
            store_part(store, group),
            preconditioner=self.preconditioner(),
            mode=mode,
            progress=self._progress,
            query_provenance=self._provenance(),
        )
        return gather_scores(scores, group=group)[:, self._order(store)]

    def self_influence(self) -> Float[Tensor, " train"]:
        """``k(i, i)`` of every training example: ``[N]``, in :meth:`train_ids` order."""
        store, group = self.extract_log(), self.group
        part = store_part(store, group)
        values = self_scores(part, preconditioner=self.preconditioner(), progress=self._progress)
        return gather_scores(values[None], group=group)[0, self._order(store)]

    def top_k(self, queries: Any, k: int, *, mode: Mode = "dot", largest: bool = True) -> TopK:
        """The ``k`` most helpful (``largest=False``: most harmful) training examples per query:
        data ids and scores, both ``[Q, k]``. With several processes only the ranks' best ``k``
        are gathered."""
        store, group = self.extract_log(), self.group
        self._order(store)  # the log holds the training set
        part = store_part(store, group)
        scores = influence_scores(
            self.query_grads(queries),
            part,
            preconditioner=self.preconditioner(),
            mode=mode,
            progress=self._progress,
            query_provenance=self._provenance(),
        )
        return gather_top_k(scores, k, group=group, ids=part.ids(), largest=largest)

    def train_ids(self) -> Tensor | list:
        """Data ids of the score columns: ``0 … N-1`` with ``ids="index"``."""
        store = LogStore.open(self._shared_url())
        ids = store.ids()
        return ids[self._order(store)] if self.args.ids == "index" else ids

    # helpers

    def _provenance(self) -> dict[str, str | None]:
        """What :meth:`grads` rows come from (the model's weights now, the spec, the loss)."""
        model = self.model
        return provenance(model, None, self.spec, loss_fn=self.args.loss_fn)

    @property
    def _progress(self) -> bool:
        if self.args.progress is not None:
            return self.args.progress
        return not self.trainer.args.disable_tqdm and self.trainer.is_local_process_zero()

    def _shared_url(self) -> str:
        """:attr:`store_url`, checked to be the same on every rank."""
        url, group = self.store_url, self.group
        if group is not None:
            urls: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(urls, url, group=group)
            if len(set(urls)) > 1:
                raise ValueError(
                    f"the ranks would log to different stores {urls}: pass the same "
                    "AttributionArguments(store=...) on every rank"
                )
        return url

    def _train(self, dataset: Any) -> Any:
        dataset = self.trainer.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("no dataset: pass one or give the Trainer a train_dataset")
        return dataset

    def _order(self, store: LogStore) -> Tensor | slice:
        """Columns in dataset order for index ids (checked complete), else the store's order."""
        if self.args.ids != "index":
            return slice(None)
        ids = store.ids()
        n = len(self._train(None))
        order = torch.argsort(ids)
        if not torch.equal(ids[order], torch.arange(n)):
            raise ValueError(
                f"the log at {store.url} does not hold exactly the training set's indices "
                f"0..{n - 1} ({len(ids)} rows): was it written for another dataset? "
                "Use a new store URL"
            )
        return order


class Batches:
    """A dataset batched in order with a trainer's collator, on the model's device.

    Like the trainer's eval loader (same collator, unused columns removed, same workers) but
    never sharded or shuffled: example ``i`` of the dataset is row ``i`` of the stream.
    """

    def __init__(self, trainer: Trainer, dataset: Any, batch_size: int | None, model: nn.Module):
        args = trainer.args
        collator = trainer.data_collator
        if _is_hf_dataset(dataset):
            dataset = remove_unused_columns(trainer, dataset, "attribution")
        else:
            collator = collator_with_removed_columns(trainer, collator, "attribution")
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size or args.eval_batch_size,
            shuffle=False,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
        )
        self.device = next(model.parameters()).device
        forward = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in forward else {}

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if "labels" not in batch:
                raise ValueError(
                    f"the collated batches have no 'labels' (keys: {sorted(batch)}); use a "
                    "collator that makes them, e.g. DataCollatorForLanguageModeling(mlm=False)"
                )
            moved = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            yield {**moved, **self.extra}


def _is_hf_dataset(dataset: Any) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)


class AttributionTrainer(Trainer):
    """A ``Trainer`` with :class:`Attribution`'s methods; ``attribution_args`` holds the options.

    ``AttributionTrainer(model=..., args=..., train_dataset=..., attribution_args=...)``, then
    ``trainer.train()`` (or not) and ``trainer.influence(queries)``.
    """

    def __init__(self, *args: Any, attribution_args: AttributionArguments | None = None, **kw):
        super().__init__(*args, **kw)
        self.attribution = Attribution(self, attribution_args)

    def extract_log(self) -> LogStore:
        """See :meth:`Attribution.extract_log`."""
        return self.attribution.extract_log()

    def influence(self, queries: Any, *, mode: Mode = "dot") -> Float[Tensor, "queries train"]:
        """See :meth:`Attribution.influence`."""
        return self.attribution.influence(queries, mode=mode)

    def self_influence(self) -> Float[Tensor, " train"]:
        """See :meth:`Attribution.self_influence`."""
        return self.attribution.self_influence()

    def top_k(self, queries: Any, k: int, *, mode: Mode = "dot", largest: bool = True) -> TopK:
        """See :meth:`Attribution.top_k`."""
        return self.attribution.top_k(queries, k, mode=mode, largest=largest)
