"""Architecture rules that a reviewer would otherwise have to remember.

Imports flow one way (cli → runner → jobs → storage); storage never imports torch; the
public API is exactly what we mean to export and importing it pulls in nothing heavy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "colabjob"
LAYERS = ["storage", "jobs", "runner"]  # lower to higher; cli/notebook sit above all


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                pkg = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                base = ".".join(pkg)
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def _layer_modules(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer: str) -> None:
    higher = LAYERS[LAYERS.index(layer) + 1 :]
    forbidden = [f"colabjob.{h}" for h in higher] + ["colabjob.cli", "colabjob.notebook"]
    offenders = [
        f"{path.relative_to(PKG)} imports {name}"
        for path in _layer_modules(layer)
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("name", ["clock.py", "errors.py"])
def test_shared_modules_import_no_layer(name: str) -> None:
    """The clock and the errors (with ``ExitCode``) sit below every layer: storage, jobs,
    runner and cli all import them, so they import nothing of colabjob themselves."""
    assert (PKG / name).is_file(), name
    assert [n for n in _imports(PKG / name) if n.startswith("colabjob")] == []


def test_storage_never_imports_torch() -> None:
    offenders = [
        f"{path.relative_to(PKG)} imports {name}"
        for path in _layer_modules("storage")
        for name in _imports(path)
        if name.split(".")[0] in {"torch", "transformers", "peft", "accelerate", "safetensors"}
    ]
    assert not offenders, offenders
    assert _layer_modules("storage"), "storage layer has no modules"


def test_import_is_light() -> None:
    """`import colabjob` (what `colabjob status` pays) must not import torch."""
    code = (
        "import sys, colabjob, colabjob.storage.store, colabjob.config, colabjob.runner.states;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_is_what_we_export() -> None:
    import colabjob

    expected = {
        "__version__",
        "ColabJobError",
        "open_store",
        "CheckpointStore",
        "JobState",
        "watchdog",
        "session",
    }
    assert set(colabjob.__all__) == expected
    for name in colabjob.__all__:
        assert getattr(colabjob, name) is not None, name
