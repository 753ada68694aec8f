"""Curvature estimators as pure init/update/finalize transforms, and preconditioners.

Math only: nothing here runs the model. The code that does — :func:`fisher_logs`,
:func:`sample_targets` (:mod:`logix_func._fisher`) and :func:`exact_curvature`
(:mod:`logix_func._exact`) — lives beside the gradient code; its names are still importable from
here, loaded on first use (PEP 562) so that importing this package never imports the engine.
"""

from importlib import import_module
from typing import Any

from ._dual import dual_ggn
from ._ekfac import ekfac
from ._joint import joint_ggn
from ._kfac import kfac
from ._precondition import (
    DualInverse,
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
    # estimators: one Transform(init, update, finalize) each
    "kfac",
    "ekfac",
    "raw",
    "joint_ggn",
    "dual_ggn",
    # the contract
    "Transform",
    "CurvatureLogs",
    # preconditioners
    "preconditioner",
    "Preconditioner",
    "IdentityPreconditioner",
    "LayerInverse",
    "JointInverse",
    "DualInverse",
    # states
    "merge_states",
    "save_state",
    "load_state",
    # run the model (live beside the gradient code, loaded on first use)
    "fisher_logs",
    "sample_targets",
    "exact_curvature",
]


def __getattr__(name: str) -> Any:
    """The names that moved to the engine layer, imported when first asked for."""
    if name in _MOVED:
        return getattr(import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
