"""What versions a stage's code: its body's module and every project module it reaches by import."""

from __future__ import annotations

from perceptio_core.config import load_config
from tasks import data as sources  # the world's folder and code version (shared by sources and benchmarks)
from tasks.runner import UNVERSIONED, _is_package_init, _module_file, module_files, project_imports_closure
from tasks.stages import BY_NAME, STAGES


def test_every_stage_is_versioned_by_its_own_module_and_what_it_imports():
    for spec in STAGES:
        mods = set(spec.code_modules())
        assert spec.body.__module__ in mods and "tasks.runner" in mods, spec.name
        assert not mods & UNVERSIONED, spec.name
        assert all(p.is_file() for p in spec.code_files())
    # reached only through perceptio_core.training.base_fit: an edit to the descriptions re-runs the base fit
    assert {"perceptio_core.training.base_fit", "perceptio_core.curation.describe", "perceptio_core.data.refer"} <= set(BY_NAME["base"].code_modules())
    # imported inside a function (the figure helper): still part of fit_sam2's version
    assert "perceptio_core.evaluation.viz" in BY_NAME["fit_sam2"].code_modules()


def test_a_stage_is_not_versioned_by_another_stages_body():
    bodies = {s.body.__module__ for s in STAGES}
    for spec in STAGES:
        assert set(spec.code_modules()) & bodies == {spec.body.__module__} | (
            {"tasks.runner"} & bodies), spec.name  # fmt: skip
    # editing the base fit or generation leaves the SAM2 fit cached
    sam2 = set(BY_NAME["fit_sam2"].code_modules())
    assert not sam2 & {"perceptio_core.training.base_fit", "perceptio_core.model.generation", "perceptio_core.evaluation.evaluate"}
    teacher = set(BY_NAME["fit_teacher"].code_modules())
    assert not teacher & {"perceptio_core.depth.vqvae", "tasks.codebook"}


def test_closure_follows_imports_transitively():
    found = project_imports_closure(["tasks.curate"])
    assert {"tasks.common", "perceptio_core.curation.curate", "perceptio_core.curation.shards", "perceptio_core.data.records"} <= found
    assert not any(m.startswith(("storage", "torch", "numpy")) for m in found)


def test_the_world_is_versioned_by_every_module_its_generator_reaches(tmp_path, monkeypatch):
    mods = set(sources.synth_code_modules())
    assert {"perceptio_core.world.synth", "perceptio_core.world.scenes", "perceptio_core.world.expressions",
            "perceptio_core.world.writers", "perceptio_core.world.render", "perceptio_core.data.markers",
            "perceptio_core.data.masks", "perceptio_core.format.prompts"} <= mods
    assert not mods & UNVERSIONED and not any(_is_package_init(m) for m in mods)
    # one more byte in a module reached only through the writers: the world moves to another folder
    cfg = load_config("smoke")
    before = sources.world_dir(cfg, tmp_path)
    edited = tmp_path / "data" / "markers.py"  # same "data/markers.py" name in the digest
    edited.parent.mkdir()
    edited.write_bytes(_module_file("perceptio_core.data.markers").read_bytes() + b"\n")
    marker = _module_file("perceptio_core.data.markers")
    monkeypatch.setattr(sources, "module_files",
                        lambda mods: [edited if f == marker else f for f in module_files(mods)])
    assert sources.world_dir(cfg, tmp_path) != before


def test_relative_imports_are_followed(tmp_path, monkeypatch):
    """A module reached only by a relative import (``from . import x``, ``from .. import y``,
    ``from .z import w``) is in the closure, so editing it re-keys the stage."""
    from tasks import runner

    pkg = tmp_path / "perceptio_core" / "fake"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "sub/__init__.py"):
        (pkg / f).write_text("")
    (tmp_path / "perceptio_core" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from . import sibling\nfrom .sub.deep import thing\n")
    (pkg / "sibling.py").write_text("X = 1\n")
    (pkg / "sub" / "deep.py").write_text("from .. import cousin\nthing = 2\n")
    (pkg / "cousin.py").write_text("Y = 3\n")
    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)
    found = runner.project_imports_closure(["perceptio_core.fake.top"])
    assert {"perceptio_core.fake.sibling", "perceptio_core.fake.sub.deep", "perceptio_core.fake.cousin"} <= found
    before = [p.read_text() for p in runner.module_files(sorted(found))]
    (pkg / "cousin.py").write_text("Y = 4\n")  # an edit is seen: the cached parse is per file version
    again = runner.project_imports_closure(["perceptio_core.fake.top"])
    assert again == found and [p.read_text() for p in runner.module_files(sorted(again))] != before


def _ast_imports(text):
    """The reference: the same statements read with ``ast`` (one thread, here)."""
    import ast

    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out.append((0, "", [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", [a.name for a in node.names if a.name != "*"]))
    return sorted(out)


def test_the_tokenizer_reads_the_imports_ast_reads_in_every_project_file():
    """The code-version walk reads imports with the tokenizer (CPython 3.11's ast.parse fails when
    threads build ASTs at once): on every file of the project it finds exactly what ast finds."""
    from tasks.runner import REPO_ROOT, import_statements

    files = [p for d in ("perceptio_core", "tasks", "flows", "storage") for p in (REPO_ROOT / d).rglob("*.py")]
    assert len(files) > 50
    for p in files:
        text = p.read_text()
        assert sorted(import_statements(text)) == _ast_imports(text), p
    tricky = ("import a.b as c, d\nfrom .. import (x,\n    y as z)  # c\nif 1: from .m import *\n"
              "s = 'import nothing'\nx = 1; import e\nfrom ...p.q import r\n")
    assert sorted(import_statements(tricky)) == _ast_imports(tricky)
