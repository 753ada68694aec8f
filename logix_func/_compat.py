"""Every private torch and Hugging Face call the package makes, in one place.

Private APIs can change between releases without notice; keeping them here means one module to
fix when they do, and ``tests/test_compat.py`` exercises each on the installed versions
(the package claims torch >= 2.5 and transformers >= 4.40).

- pytree: ``tree_flatten``, ``tree_unflatten``, ``tree_map``, ``tree_leaves`` over nested
  dicts, lists and tuples of tensors (``torch.utils._pytree``).
- `reparametrize_module`: a context manager that swaps a module's parameters and buffers for
  the given tensors in place and restores them on exit (what ``functional_call`` uses inside).
- `torch_function_mode_enabled`: whether a ``TorchFunctionMode`` is active.
- `under_transform`: whether the code runs under ``torch.compile`` or a torch.func transform
  (``grad``, ``vmap``), where eager autograd (``torch.autograd.grad``) is not available.
- `remove_unused_columns`, `collator_with_removed_columns`: a Hugging Face ``Trainer``'s own
  handling of columns its model's ``forward`` does not take.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils.stateless import _reparametrize_module as reparametrize_module
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

__all__ = [
    "collator_with_removed_columns",
    "remove_unused_columns",
    "reparametrize_module",
    "torch_function_mode_enabled",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_unflatten",
    "under_transform",
]


def torch_function_mode_enabled() -> bool:
    """True inside an active ``TorchFunctionMode``."""
    return torch._C._is_torch_function_mode_enabled()


def under_transform() -> bool:
    """True while compiling or inside a torch.func transform (the functorch interpreter stack)."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def remove_unused_columns(trainer: Any, dataset: Any, description: str) -> Any:
    """A ``datasets.Dataset`` without the columns ``trainer.model.forward`` does not take."""
    return trainer._remove_unused_columns(dataset, description=description)


def collator_with_removed_columns(trainer: Any, collator: Any, description: str) -> Any:
    """``collator`` wrapped to drop the keys ``trainer.model.forward`` does not take."""
    return trainer._get_collator_with_removed_columns(collator, description)
