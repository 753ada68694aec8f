"""logix_func: functional data attribution with torch.func."""

from .grads import per_sample_grads
from .ids import DuplicateIdError, IndexedDataset, check_unique, content_ids, index_ids, string_ids
from .stats import RunningStat, running_covariance, running_mean, running_variance

__version__ = "0.1.0"
__all__ = ["per_sample_grads"]
__all__ += ["DuplicateIdError", "IndexedDataset", "check_unique", "content_ids", "index_ids"]
__all__ += ["string_ids", "RunningStat", "running_covariance", "running_mean", "running_variance"]
