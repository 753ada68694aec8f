"""logix_func: functional data attribution with torch.func.

The facade: every public name, grouped as the layers of ``docs/architecture.md``. The
implementation lives in private modules (``_name.py``); the public sub-namespaces are
``curvature``, ``store``, ``pipeline``, ``distributed`` (torchrun helpers), ``metrics``,
``plots``, ``layers``, ``typing``, ``integrations`` and ``demo``.
"""

import warnings
from typing import Any

from . import curvature, distributed, metrics, pipeline, store
from ._capture import capture, capture_shapes, flatten_capture, unflatten_capture
from ._completions import completion_labels, prompt_completion_batch
from ._ensemble import (
    Member,
    check_members,
    ensemble_influence,
    ensemble_influence_chunks,
    ensemble_self_influence,
    ensemble_top_k,
    fit_members,
    member_weights,
)
from ._exact import exact_curvature
from ._fisher import fisher_logs, sample_targets
from ._grads import per_sample_grads
from ._ids import DuplicateIdError, IndexedDataset, check_unique, content_ids, index_ids, string_ids
from ._influence import TopK, influence, influence_chunks, self_influence, top_k
from ._origin import check_provenance, provenance, weights_fingerprint
from ._projected_grads import projected_grads
from ._projection import ProjectionSpec, logra
from ._stats import RunningStat, running_covariance, running_mean, running_variance
from ._tokens import token_influence
from ._version import __version__ as __version__
from ._watch import watch
from .curvature import ekfac, kfac, load_state, merge_states, preconditioner, save_state
from .layers import LayerSpec
from .metrics import lds, loo_correlation, pearson, spearman
from .pipeline import fit_curvature, log_dataset, query_grads, store_schema
from .store import LogStore, StoreSchema, model_fingerprint

__all__ = [
    # core: per-sample and LoGra-projected gradients, captures
    "per_sample_grads",
    "projected_grads",
    "ProjectionSpec",
    "LayerSpec",
    "logra",
    "capture",
    "capture_shapes",
    "flatten_capture",
    "unflatten_capture",
    "watch",
    "completion_labels",
    "prompt_completion_batch",
    # curvature (transforms, raw covariance and preconditioner types: logix_func.curvature)
    "fit_curvature",
    "fisher_logs",
    "sample_targets",
    "exact_curvature",
    "kfac",
    "ekfac",
    "merge_states",
    "save_state",
    "load_state",
    "preconditioner",
    # store and pipeline (torchrun helpers: logix_func.distributed)
    "LogStore",
    "StoreSchema",
    "store_schema",
    "model_fingerprint",
    "log_dataset",
    "query_grads",
    # analysis: influence, ensembles and accuracy metrics
    "influence",
    "influence_chunks",
    "self_influence",
    "top_k",
    "TopK",
    "token_influence",
    "Member",
    "fit_members",
    "member_weights",
    "check_members",
    "ensemble_influence",
    "ensemble_influence_chunks",
    "ensemble_self_influence",
    "ensemble_top_k",
    "lds",
    "loo_correlation",
    "pearson",
    "spearman",
    # data ids and provenance
    "IndexedDataset",
    "DuplicateIdError",
    "check_unique",
    "content_ids",
    "index_ids",
    "string_ids",
    "provenance",
    "check_provenance",
    "weights_fingerprint",
    # running statistics (the curvature transforms' contract)
    "RunningStat",
    "running_mean",
    "running_variance",
    "running_covariance",
    # sub-namespaces
    "curvature",
    "distributed",
    "metrics",
    "pipeline",
    "store",
]

_MOVED = {
    **{
        name: distributed
        for name in (
            "rank_batches",
            "store_part",
            "all_reduce_state",
            "broadcast_state",
            "gather_scores",
            "gather_top_k",
            "full_params",
            "local_model",
        )
    },
    **{name: curvature for name in ("raw", "Preconditioner", "IdentityPreconditioner")},
}


def __getattr__(name: str) -> Any:
    """Names that moved to a sub-namespace still resolve, with a ``DeprecationWarning``."""
    if name in _MOVED:
        home = _MOVED[name].__name__
        warnings.warn(
            f"logix_func.{name} moved to {home}.{name}; the old name will go in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_MOVED[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
