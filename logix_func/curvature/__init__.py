"""Curvature estimators as pure init/update/finalize transforms, and preconditioners.

Math only: nothing here runs the model. The code that does — :func:`fisher_logs`,
:func:`sample_targets` (:mod:`logix_func._fisher`) and :func:`exact_curvature`
(:mod:`logix_func._exact`) — lives beside the gradient code; its names are still importable from
here, loaded on first use (PEP 562) so that importing this package never imports the engine.
"""

from importlib import import_module
from typing import Any

from ._ekfac import ekfac
from ._joint import joint_ggn
from ._kfac import kfac
from ._precondition import (
    IdentityPreconditioner,
    JointInverse,
    LayerInverse,
    Preconditioner,
    preconditioner,
)
from ._raw import raw
from ._state import load_state, merge_states, save_state
from .transform import CurvatureLogs, Transform

_MOVED = {
    "LabelSampler": "logix_func._fisher",
    "exact_curvature": "logix_func._exact",
    "fisher_logs": "logix_func._fisher",
    "sample_targets": "logix_func._fisher",
}

__all__ = [
    "CurvatureLogs",
    "IdentityPreconditioner",
    "JointInverse",
    "LayerInverse",
    "Preconditioner",
    "Transform",
    "ekfac",
    "exact_curvature",
    "fisher_logs",
    "joint_ggn",
    "kfac",
    "load_state",
    "merge_states",
    "preconditioner",
    "raw",
    "sample_targets",
    "save_state",
]


def __getattr__(name: str) -> Any:
    """The names that moved to the engine layer, imported when first asked for."""
    if name in _MOVED:
        return getattr(import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
