"""logix_func: functional data attribution with torch.func."""

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
from .grads import per_sample_grads
from .ids import DuplicateIdError, IndexedDataset, check_unique, content_ids, index_ids, string_ids
from .influence import TopK, influence, influence_chunks, self_influence, top_k
from .layers import LayerSpec
from .metrics import lds, loo_correlation, pearson, spearman
from .pipeline import fit_curvature, log_dataset
from .projected import projected_grads
from .projection import ProjectionSpec, logra
from .stats import RunningStat, running_covariance, running_mean, running_variance
from .store import LogStore, StoreSchema, model_fingerprint
from .tokens import token_influence

__version__ = "0.1.0"
__all__ = [
    "DuplicateIdError",
    "IdentityPreconditioner",
    "IndexedDataset",
    "LayerSpec",
    "LogStore",
    "Preconditioner",
    "ProjectionSpec",
    "RunningStat",
    "StoreSchema",
    "TopK",
    "check_unique",
    "content_ids",
    "ekfac",
    "exact_curvature",
    "fisher_logs",
    "fit_curvature",
    "index_ids",
    "influence",
    "influence_chunks",
    "kfac",
    "lds",
    "load_state",
    "log_dataset",
    "logra",
    "loo_correlation",
    "pearson",
    "merge_states",
    "model_fingerprint",
    "per_sample_grads",
    "preconditioner",
    "projected_grads",
    "raw",
    "running_covariance",
    "running_mean",
    "running_variance",
    "sample_targets",
    "save_state",
    "self_influence",
    "spearman",
    "string_ids",
    "token_influence",
    "top_k",
]
