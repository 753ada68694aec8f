"""The digits demo: reference problems (`digits`) and the ``logix-func`` command (`cli`).

Not part of the library core: nothing in ``logix_func`` outside this package imports it.
"""
