"""Alias of `logix_func.demo.cli`, kept so that ``logix_func.cli`` imports keep working."""

from .demo.cli import (
    COMMANDS,
    PROG,
    describe_store,
    main,
    print_attributions,
    run_demo,
    run_inspect,
    run_score,
    run_top_k,
)

__all__ = [
    "COMMANDS",
    "PROG",
    "describe_store",
    "main",
    "print_attributions",
    "run_demo",
    "run_inspect",
    "run_score",
    "run_top_k",
]
