"""The layering of docs/architecture.md, read from the source with ``ast``: ``curvature/`` is math
only, and the engine's reducers share it through ``_tap`` rather than through each other."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import logix_func
import logix_func as lf

ROOT = Path(logix_func.__file__).parent
# the modules that run the model: the engine, its reducers and the code built on them
ENGINE = {"_tap", "_projected_grads", "_capture", "_grads", "_batch", "_watch", "_completions"}
ENGINE = {f"logix_func.{m}" for m in ENGINE | {"_fisher", "_exact"}}
REDUCERS = ("logix_func._projected_grads", "logix_func._capture")


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def imports(module: str) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every import statement in ``module``, at any depth (function-level
    ones too); ``name`` is None for ``import x``, the module is resolved when a name is one."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (base, alias.name))
    return found


def reached(module: str) -> set[str]:
    """Every package module ``module`` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for target, _ in imports(todo.pop()):
            if target in MODULES and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_named_modules_exist():
    assert ENGINE | set(REDUCERS) <= set(MODULES)


def test_no_module_is_shadowed_by_a_function_of_its_name():
    for module in MODULES:
        package, _, leaf = module.rpartition(".")
        if package and leaf and not leaf.startswith("_"):
            attribute = getattr(importlib.import_module(package), leaf, None)
            assert attribute is None or inspect.ismodule(attribute), f"{module} is shadowed"


def test_the_import_reader_resolves_relative_imports():
    assert ("logix_func._tap", "Pass") in imports("logix_func._projected_grads")
    assert ("logix_func.curvature._kfac", "FISHERS") in imports("logix_func._fisher")
    assert "logix_func._projected_grads" in reached("logix_func._fisher")
    assert "logix_func._tap" in reached("logix_func._fisher")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("logix_func.curva")))
def test_curvature_modules_do_not_reach_the_engine(module):
    assert not reached(module) & ENGINE, f"{module} imports the engine"


@pytest.mark.parametrize("module", REDUCERS)
def test_reducers_use_the_engine_not_each_other(module):
    assert "logix_func._tap" in {target for target, _ in imports(module)}
    other = next(m for m in REDUCERS if m != module)
    assert other not in reached(module)
    private = [
        f"{target}.{name}"
        for target, name in imports(module)
        if target.startswith("logix_func") and name and name.startswith("_")
    ]
    assert not private, f"{module} imports private names {private}"


def test_moved_names_still_import_from_curvature():
    from logix_func.curvature import LabelSampler, exact_curvature, fisher_logs, sample_targets

    assert (fisher_logs, sample_targets, exact_curvature) == (
        lf.fisher_logs,
        lf.sample_targets,
        lf.exact_curvature,
    )
    assert LabelSampler is logix_func._fisher.LabelSampler
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        logix_func.curvature.nope  # noqa: B018
