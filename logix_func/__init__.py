"""logix_func: functional data attribution with torch.func."""

from ._version import __version__ as __version__
from .capturing import capture, capture_shapes, flatten_capture, unflatten_capture
from .completions import completion_labels, prompt_completion_batch
from .curvature import (
    IdentityPreconditioner,
    Preconditioner,
    ekfac,
    kfac,
    load_state,
    merge_states,
    preconditioner,
    raw,
    save_state,
)
from .distributed import (
    all_reduce_state,
    broadcast_state,
    full_params,
    gather_scores,
    gather_top_k,
    local_model,
    rank_batches,
    store_part,
)
from .ensemble import (
    Member,
    check_members,
    ensemble_influence,
    ensemble_influence_chunks,
    ensemble_self_influence,
    ensemble_top_k,
    fit_members,
    member_weights,
)
from .exact import exact_curvature
from .fisher import fisher_logs, sample_targets
from .grads import per_sample_grads
from .ids import DuplicateIdError, IndexedDataset, check_unique, content_ids, index_ids, string_ids
from .influence import TopK, influence, influence_chunks, self_influence, top_k
from .layers import LayerSpec
from .metrics import lds, loo_correlation, pearson, spearman
from .origin import provenance, weights_fingerprint
from .pipeline import fit_curvature, log_dataset, query_grads, store_schema
from .projected import projected_grads
from .projection import ProjectionSpec, logra
from .stats import RunningStat, running_covariance, running_mean, running_variance
from .store import LogStore, StoreSchema, model_fingerprint
from .tokens import token_influence
from .watching import watch

__all__ = [
    # core: per-sample gradients, LoGra projections, capture
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
    # curvature
    "fit_curvature",
    "fisher_logs",
    "sample_targets",
    "exact_curvature",
    "kfac",
    "ekfac",
    "raw",
    "merge_states",
    "save_state",
    "load_state",
    "preconditioner",
    "Preconditioner",
    "IdentityPreconditioner",
    # store and pipeline
    "LogStore",
    "StoreSchema",
    "store_schema",
    "model_fingerprint",
    "log_dataset",
    "query_grads",
    # analysis: influence and accuracy metrics
    "influence",
    "influence_chunks",
    "self_influence",
    "top_k",
    "TopK",
    "token_influence",
    "lds",
    "loo_correlation",
    "pearson",
    "spearman",
    # ensembles
    "Member",
    "fit_members",
    "member_weights",
    "check_members",
    "ensemble_influence",
    "ensemble_influence_chunks",
    "ensemble_self_influence",
    "ensemble_top_k",
    # data ids and provenance
    "IndexedDataset",
    "DuplicateIdError",
    "check_unique",
    "content_ids",
    "index_ids",
    "string_ids",
    "provenance",
    "weights_fingerprint",
    # running statistics
    "RunningStat",
    "running_mean",
    "running_variance",
    "running_covariance",
    # torchrun helpers (also in logix_func.distributed)
    "rank_batches",
    "store_part",
    "all_reduce_state",
    "broadcast_state",
    "gather_scores",
    "gather_top_k",
    "full_params",
    "local_model",
]
