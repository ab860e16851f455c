"""The package's layout rules, read from the code's own imports: imports run downhill, the core
never imports the Shapes world, inference never imports training, and modules stay readable."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lverse"
MODULES = sorted(PACKAGE.rglob("*.py"))
# Floors, lowest first: a module may import from its own floor and the floors below it.
FLOORS = [
    {"vocab", "config", "files", "dist", "tokenizer"},
    {"models", "data", "convert"},
    {"train", "inference"},
    {"eval"},
    {"shapes", "serve"},  # serve: the web page on the inference API (never imports shapes: the core rule)
    {"cli", "__main__"},
]


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _floor(part: str) -> int:
    return next(i for i, names in enumerate(FLOORS) if part in names)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``lverse.*`` import in the file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("lverse.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("lverse."):
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downhill(path: Path) -> None:
    here = _part(path)
    for line, module in _imports(path):
        there = module.split(".")[1]
        if here == "__init__":  # the package's face imports nothing of its own
            pytest.fail(f"lverse/__init__.py:{line} imports {module}")
        assert _floor(there) <= _floor(here), f"{path.relative_to(PACKAGE)}:{line} imports {module} (uphill)"
        if here not in ("shapes", "cli", "__main__"):
            assert there != "shapes", f"{path.relative_to(PACKAGE)}:{line}: the core imports the Shapes world"
        if here == "inference":
            assert there != "train", f"{path.relative_to(PACKAGE)}:{line}: inference imports training"


def test_no_relative_imports_and_no_module_over_650_lines() -> None:
    for path in MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), path
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 650, f"{path} is over 650 lines"


def test_the_rules_catch_what_they_forbid(tmp_path: Path) -> None:
    # the checker itself: an uphill import and a Shapes import in the core are found
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom lverse.shapes.scenes import Scene\n\ndef f():\n    import lverse.cli.sample\n")
    assert _imports(bad) == [(2, "lverse.shapes.scenes"), (5, "lverse.cli.sample")]
    assert _floor("cli") > _floor("train") > _floor("models") > _floor("vocab")
