"""The public API is what ``colabjob.__all__`` and the README name, and each public module's
``__all__`` is exactly its public namespace (as httpx tests its own): derived from the
modules and the README, not from a list copied here."""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
from pathlib import Path
from types import ModuleType

import pytest

import colabjob

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_paths() -> set[str]:
    """Every dotted ``colabjob.…`` path in the README's code (blocks and inline spans)."""
    text = README.read_text()
    code = re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`[^`\n]+`", text)
    paths = {p for chunk in code for p in re.findall(r"\bcolabjob(?:\.\w+)+", chunk)}
    for chunk in code:  # `from colabjob.hf import resumable`
        for module, names in re.findall(r"from (colabjob[\w.]*) import ([\w, ]+)", chunk):
            paths |= {f"{module}.{n.strip()}" for n in names.split(",") if n.strip()}
    return paths


def _resolve(path: str) -> tuple[ModuleType, str | None]:
    """The longest importable module prefix of ``path`` and the attribute after it."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        rest = parts[i:]
        assert len(rest) <= 1, f"{path}: {'.'.join(rest)} is not a name of {module.__name__}"
        return module, rest[0] if rest else None
    raise AssertionError(f"{path} is not importable")


def _documented_modules() -> list[str]:
    """The modules the README names a name of (``colabjob.jobs.data.make_loader``: its
    ``colabjob.jobs.data``)."""
    found = {_resolve(p)[0].__name__ for p in _readme_paths() if _resolve(p)[1] is not None}
    found.discard("colabjob")
    return sorted(found)


def _defined_here(module: ModuleType) -> set[str]:
    """The public names a module defines itself: its top-level functions, classes and
    assignments (not what it imports), less modules and its logger."""
    names: set[str] = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    plumbing = (ModuleType, logging.Logger)
    return {n for n in names if not n.startswith("_") and not isinstance(vars(module)[n], plumbing)}


def test_the_readme_names_public_modules() -> None:
    assert {"colabjob.hf", "colabjob.jobs.data", "colabjob.errors"} <= set(_documented_modules())


def test_the_top_level_exports_what_all_names() -> None:
    assert dir(colabjob) == sorted(colabjob.__all__)
    assert set(colabjob.__all__) == {"__version__", *colabjob._EXPORTS}
    for name, (module, attr) in colabjob._EXPORTS.items():
        value = getattr(colabjob, name)
        assert value is getattr(importlib.import_module(module), attr)
        assert getattr(value, "__module__", module) == module, f"{name}: not from its owner"
        assert attr in importlib.import_module(module).__all__, f"{module}.{attr}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        colabjob.nope  # noqa: B018


@pytest.mark.parametrize("name", _documented_modules())
def test_a_public_modules_all_is_its_public_namespace(name: str) -> None:
    """Every public name the module defines is exported (or is made private), and every
    exported name exists: defined here, or imported from the colabjob module owning it."""
    module = importlib.import_module(name)
    exported = set(getattr(module, "__all__", ()))
    assert exported, f"{name} has no __all__"
    assert _defined_here(module) <= exported, f"{name}: public but not in __all__"
    for n in exported - _defined_here(module):
        owner = getattr(getattr(module, n, None), "__module__", None)
        assert owner is not None and owner.startswith("colabjob."), f"{name}.{n}"
        assert n in importlib.import_module(owner).__all__, f"{name}.{n}: from {owner}"


@pytest.mark.parametrize("path", sorted(_readme_paths()))
def test_every_path_the_readme_names_is_public(path: str) -> None:
    module, attr = _resolve(path)
    if attr is not None:
        assert hasattr(module, attr), f"{path} does not exist"
        public = colabjob.__all__ if module is colabjob else getattr(module, "__all__", ())
        assert attr in public, f"{path} is not in {module.__name__}.__all__"
