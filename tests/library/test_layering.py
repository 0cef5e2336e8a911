"""The library/lab boundary: ``selective_backprop`` (torch + numpy only) never imports its lab, ``.experiments``;
an integration (``integrations/<framework>.py``) may import its own framework too, and nothing imports it.

Two checks: a static walk of every import statement of every library module (including imports inside functions,
so a lazy import cannot slip through), and a fresh interpreter that imports the library's entry points and then
looks at what got loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import selective_backprop

PACKAGE = Path(selective_backprop.__file__).parent
LAB = PACKAGE / "experiments"
INTEGRATIONS = PACKAGE / "integrations"
FRAMEWORKS = {"lightning", "pytorch_lightning", "transformers", "accelerate"}  # none may be loaded by the library
ENTRY_POINT = PACKAGE / "__main__.py"  # `python -m selective_backprop` runs the lab's CLI; the library never imports it
ALLOWED = {"selective_backprop", "torch", "numpy", "__future__", *sys.stdlib_module_names}


def allowed_tops(path: Path) -> set[str]:
    """Top-level packages a library module may import: an integration ``integrations/<framework>.py`` its own too."""
    return ALLOWED | ({path.stem} if path.parent == INTEGRATIONS and path.stem != "__init__" else set())


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if LAB not in p.parents and p != ENTRY_POINT)


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``; relative imports resolved against ``package``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names = [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
            found += [(node.lineno, name) for name in names]
    return found


def test_the_walk_sees_relative_lazy_and_absolute_imports():
    """The checker itself: it must resolve the ways a lab import could be written."""
    source = (
        "from .experiments import cli\nimport selective_backprop.experiments.data\n"
        "def f():\n    from . import experiments\n    from ..experiments.data import load_dataset\n"
    )
    names = [name for _, name in imported_modules(source, ["selective_backprop", "sub"])]
    assert names == ["selective_backprop.sub.experiments", "selective_backprop.experiments.data",
                     "selective_backprop.sub.experiments", "selective_backprop.experiments.data"]  # fmt: skip
    top = [name for _, name in imported_modules("from .experiments import cli\n", ["selective_backprop"])]
    assert top == ["selective_backprop.experiments"]


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_module_imports_only_the_library_torch_numpy_and_the_standard_library(path):
    package = ["selective_backprop", *path.relative_to(PACKAGE).parent.parts]
    for line, name in imported_modules(path.read_text(), package):
        top = name.split(".")[0]
        where = f"{path.relative_to(PACKAGE)}:{line} imports {name}"
        assert not (name == "selective_backprop.experiments" or name.startswith("selective_backprop.experiments.")), (
            f"{where}: the library must not import the lab"
        )
        assert top in allowed_tops(path), (
            f"{where}: the library may import only torch, numpy and the standard library (an integration: its own "
            "framework too)"
        )


def test_importing_the_library_loads_no_lab_module_and_no_framework():
    code = (
        "import sys, selective_backprop, selective_backprop.distributed, selective_backprop.integrations\n"
        "print(sorted(m for m in sys.modules if m.startswith('selective_backprop.experiments')\n"
        f"             or m.split('.')[0] in {sorted(FRAMEWORKS)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_integration_may_import_its_own_framework_only():
    lightning, hf = INTEGRATIONS / "lightning.py", INTEGRATIONS / "transformers.py"
    assert "lightning" in allowed_tops(lightning) and "transformers" not in allowed_tops(lightning)
    assert "transformers" in allowed_tops(hf) and "lightning" not in allowed_tops(hf)
    assert not FRAMEWORKS & allowed_tops(PACKAGE / "selector.py")
    assert not FRAMEWORKS & allowed_tops(INTEGRATIONS / "__init__.py")


def test_public_api_is_what_all_promises():
    for name in selective_backprop.__all__:
        assert hasattr(selective_backprop, name), name
    assert "Selector" in selective_backprop.__all__ and "SelectiveBackprop" in selective_backprop.__all__
