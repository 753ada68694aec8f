"""logix_func: functional data attribution with torch.func."""

from .capturing import capture, capture_shapes, flatten_capture, unflatten_capture
from .completions import completion_labels, prompt_completion_batch
from .curvature import (
    IdentityPreconditioner,
    Preconditioner,
    ekfac,
    exact_curvature,
    fisher_logs,
    kfac,
    load_state,
    merge_states,
    preconditioner,
    raw,
    sample_targets,
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

__version__ = "0.1.0"
__all__ = [
    "DuplicateIdError",
    "IdentityPreconditioner",
    "IndexedDataset",
    "LayerSpec",
    "LogStore",
    "Member",
    "Preconditioner",
    "ProjectionSpec",
    "RunningStat",
    "StoreSchema",
    "TopK",
    "all_reduce_state",
    "broadcast_state",
    "capture",
    "capture_shapes",
    "check_members",
    "check_unique",
    "completion_labels",
    "content_ids",
    "ekfac",
    "ensemble_influence",
    "ensemble_influence_chunks",
    "ensemble_self_influence",
    "ensemble_top_k",
    "exact_curvature",
    "fisher_logs",
    "fit_curvature",
    "fit_members",
    "flatten_capture",
    "full_params",
    "gather_scores",
    "gather_top_k",
    "index_ids",
    "influence",
    "influence_chunks",
    "kfac",
    "lds",
    "load_state",
    "local_model",
    "log_dataset",
    "logra",
    "loo_correlation",
    "member_weights",
    "merge_states",
    "model_fingerprint",
    "pearson",
    "per_sample_grads",
    "preconditioner",
    "projected_grads",
    "prompt_completion_batch",
    "provenance",
    "query_grads",
    "rank_batches",
    "raw",
    "running_covariance",
    "running_mean",
    "running_variance",
    "sample_targets",
    "save_state",
    "self_influence",
    "spearman",
    "store_part",
    "store_schema",
    "string_ids",
    "token_influence",
    "top_k",
    "unflatten_capture",
    "watch",
    "weights_fingerprint",
]
