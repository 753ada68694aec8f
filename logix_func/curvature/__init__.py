"""Curvature estimators as pure init/update/finalize transforms, and preconditioners."""

from .ekfac import ekfac
from .exact import exact_curvature
from .fisher import fisher_logs, sample_targets
from .kfac import kfac
from .precondition import IdentityPreconditioner, LayerInverse, Preconditioner, preconditioner
from .raw import raw
from .state import load_state, merge_states, save_state
from .transform import CurvatureLogs, Transform

__all__ = [
    "CurvatureLogs",
    "IdentityPreconditioner",
    "LayerInverse",
    "Preconditioner",
    "Transform",
    "ekfac",
    "exact_curvature",
    "fisher_logs",
    "kfac",
    "load_state",
    "merge_states",
    "preconditioner",
    "raw",
    "sample_targets",
    "save_state",
]
