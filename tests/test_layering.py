"""Dependencies point one way: flows -> tasks -> {perceptio_core, storage} (STYLE.md, house rule 1),
and inside ``perceptio_core`` its subpackages are layered as their ``__init__`` docstrings say."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "perceptio_core"

# What each subpackage of perceptio_core may import from the others (the root modules config,
# device and atomic_io are open to all). A package is above everything it may import.
MAY_IMPORT: dict[str, set[str]] = {
    "format": set(),
    "data": {"format"},
    "world": {"format", "data"},
    "depth": {"data"},
    "curation": {"format", "data"},
    "model": {"format", "data", "depth"},
    "evaluation": {"format", "data", "depth", "model"},
    "training": {"format", "data", "depth", "curation", "model", "evaluation"},
}
ROOT_MODULES = {"config", "device", "atomic_io"}


def _imports(pkg: str) -> set[tuple[str, str]]:
    """(top-level module imported, importing file) for every absolute import under ``pkg``."""
    return {(name.split(".")[0], f) for name, f in _dotted_imports(ROOT / pkg)}


def _dotted_imports(folder: Path) -> set[tuple[str, str]]:
    out = set()
    for f in sorted(folder.rglob("*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        rel = str(f.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out |= {(a.name, rel) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add((node.module, rel))
                out |= {(f"{node.module}.{a.name}", rel) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                out.add(("<relative>", rel))
    return out


def test_core_imports_no_prefect_and_no_upper_layer():
    bad = {(m, f) for m, f in _imports("perceptio_core") if m in {"prefect", "flows", "tasks", "storage"}}
    assert not bad, f"perceptio_core must not import these: {sorted(bad)}"


def test_core_has_only_subpackages_and_root_modules():
    """The flat layout does not creep back: a new module goes into the subpackage of its concept."""
    loose = {p.stem for p in CORE.glob("*.py")} - ROOT_MODULES - {"__init__"}
    assert not loose, f"put these in a subpackage of perceptio_core: {sorted(loose)}"
    assert {p.name for p in CORE.iterdir() if (p / "__init__.py").is_file()} == set(MAY_IMPORT)


@pytest.mark.parametrize("pkg", sorted(MAY_IMPORT))
def test_subpackage_imports_only_what_its_layer_allows(pkg):
    allowed = MAY_IMPORT[pkg] | {pkg}
    bad = set()
    for name, f in _dotted_imports(CORE / pkg):
        if name == "<relative>":
            bad.add(("relative import", f))
            continue
        parts = name.split(".")
        if parts[0] != "perceptio_core" or len(parts) < 2:
            continue
        if parts[1] in MAY_IMPORT and parts[1] not in allowed:
            bad.add((name, f))
    assert not bad, f"perceptio_core.{pkg} may import only {sorted(allowed)} (+ root modules): {sorted(bad)}"


def test_root_modules_import_no_subpackage():
    bad = {(m, f) for f in ROOT_MODULES for m, _ in _dotted_imports_of(CORE / f"{f}.py")
           if m.startswith("perceptio_core.") and m.split(".")[1] in MAY_IMPORT}
    assert not bad, sorted(bad)


def _dotted_imports_of(path: Path) -> set[tuple[str, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add((node.module, path.name))
        elif isinstance(node, ast.Import):
            out |= {(a.name, path.name) for a in node.names}
    return out


def test_every_subpackage_says_what_it_may_import():
    for pkg in MAY_IMPORT:
        doc = ast.get_docstring(ast.parse((CORE / pkg / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"perceptio_core/{pkg}/__init__.py: say what it may import"


def test_storage_imports_no_prefect_and_no_upper_layer():
    bad = {(m, f) for m, f in _imports("storage") if m in {"prefect", "flows", "tasks"}}
    assert not bad, sorted(bad)


def test_tasks_do_not_import_flows():
    bad = {(m, f) for m, f in _imports("tasks") if m == "flows"}
    assert not bad, sorted(bad)


def test_no_torchvision_anywhere():
    bad = {(m, f) for pkg in ("perceptio_core", "storage", "tasks", "flows", "bench")
           for m, f in _imports(pkg) if m == "torchvision"}
    assert not bad, sorted(bad)
