"""``watch(name, tensor)``: mark an intermediate tensor of a forward pass for capture.

The identity everywhere, except while :func:`~logix_func._capture.capture` runs the model: then
the tensor (and, if asked, the gradient of the loss with respect to it) is recorded under
``name``. It follows the ``__torch_function__`` protocol, so a forward that calls it needs no
other change, costs nothing outside capture, and compiles (``fullgraph=True``) either way.
"""

from __future__ import annotations

from torch import Tensor
from torch.overrides import handle_torch_function

from ._compat import torch_function_mode_enabled


def watch(name: str, tensor: Tensor) -> Tensor:
    """Return ``tensor`` unchanged; inside ``capture(..., watch=...)`` it is recorded as ``name``.

    ``tensor`` is ``[B, *tokens, features]`` (batch first). Names are unique within one
    forward pass and contain no ``/``.
    """
    if torch_function_mode_enabled():
        return handle_torch_function(watch, (tensor,), name, tensor)
    return tensor
