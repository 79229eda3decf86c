"""Dependencies point one way: flows -> tasks -> {perceptio_core, storage} (STYLE.md, house rule 1)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(pkg: str) -> set[str]:
    out = set()
    for f in (ROOT / pkg).rglob("*.py"):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out |= {(a.name.split(".")[0], str(f.relative_to(ROOT))) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add((node.module.split(".")[0], str(f.relative_to(ROOT))))
    return out


def test_core_imports_no_prefect_and_no_upper_layer():
    bad = {(m, f) for m, f in _imports("perceptio_core") if m in {"prefect", "flows", "tasks", "storage"}}
    assert not bad, f"perceptio_core must not import these: {sorted(bad)}"


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
