"""The package's layers (docs/ARCHITECTURE.md): every fope_lm import, at module level or inside a function, goes to the
same layer or one below it; training/ and evaluation/ do not import each other; and nothing outside fope_lm.position
names a position encoding or a length-scaling method in code."""

import ast
from pathlib import Path

import pytest

from fope_lm.position import available
from fope_lm.position.scaling import SCALINGS

PACKAGE = Path(__file__).resolve().parents[1] / "fope_lm"
# lowest first; a module may import its own layer and those below
LAYERS = [
    {"errors", "schema", "provenance", "paths", "faults", "devices"},
    {"position"},
    {"nn"},
    {"data", "checkpoint", "run_dir", "tracking"},
    {"training", "evaluation"},
    {"hf"},
    {"bench", "cli"},
]
SIBLINGS_APART = {("training", "evaluation"), ("evaluation", "training")}


def layer_of(part: str) -> int:
    return next(index for index, names in enumerate(LAYERS) if part in names)


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py" or path.parent != PACKAGE)


def imported_parts(path: Path) -> set[str]:
    """The top-level fope_lm parts (a subpackage or a module) a file imports from."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "fope_lm" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for part in imported_parts(path) - {own}:
        assert (own, part) not in SIBLINGS_APART, f"{path.name}: {own}/ imports {part}/"
        assert layer_of(part) <= layer_of(own), f"{path.relative_to(PACKAGE)} imports fope_lm.{part}, a layer above it"


def test_no_encoding_or_scaling_method_is_named_outside_position():
    """Code outside fope_lm.position asks the encoding's spec; names in comments and docstrings are fine, as are the
    benchmarks and the paper's sweep (which choose encodings to compare)."""
    names = (set(available()) | set(SCALINGS)) - {"none"}
    offenders = []
    for path in modules():
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("position", "bench") or relative == Path("training/sweep.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append((str(relative), node.value))
    assert sorted(offenders) == [("nn/model.py", "rope")]  # ModelConfig's default encoding, and only it
