"""logix_func: functional data attribution with torch.func."""

from .curvature import (
    IdentityPreconditioner,
    Preconditioner,
    ekfac,
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
from .influence import TopK, influence, influence_chunks, self_influence, top_k

__version__ = "0.1.0"
__all__ = [
    "IdentityPreconditioner",
    "Preconditioner",
    "TopK",
    "ekfac",
    "fisher_logs",
    "influence",
    "influence_chunks",
    "kfac",
    "load_state",
    "merge_states",
    "per_sample_grads",
    "preconditioner",
    "raw",
    "sample_targets",
    "save_state",
    "self_influence",
    "top_k",
]
