"""logix_func: functional data attribution with torch.func."""

from .grads import per_sample_grads

__version__ = "0.1.0"
__all__ = ["per_sample_grads"]

from .store import LogStore, StoreSchema, model_fingerprint

__all__ += ["LogStore", "StoreSchema", "model_fingerprint"]
