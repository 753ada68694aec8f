"""logix_func: functional data attribution with torch.func."""

from .grads import per_sample_grads
from .layers import LayerSpec
from .logra import projected_grads
from .projection import ProjectionSpec, logra

__version__ = "0.1.0"
__all__ = ["per_sample_grads"]
__all__ += ["LayerSpec", "ProjectionSpec", "logra", "projected_grads"]
